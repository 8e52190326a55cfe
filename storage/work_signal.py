"""Wake an idle runner soon after new work is queued, without hammering the database.

SQLite: `PRAGMA data_version` changes whenever another connection commits; reading it is a
few microseconds, so an idle runner can look every few milliseconds.
PostgreSQL: LISTEN on the channel that `JobQueue.enqueue` NOTIFYs.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Protocol

from storage.db import Database
from storage.queue import NOTIFY_CHANNEL


class WorkSignal(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until something may have changed (True) or the timeout passed (False)."""
        ...

    def close(self) -> None: ...


class SQLiteWorkSignal:
    """Made in one thread and waited on in another (a runner's loop): `data_version` only
    compares within one connection, so the connection is shared, one user at a time."""

    def __init__(self, path: str, *, poll_interval: float = 0.003) -> None:
        self._conn = sqlite3.connect(
            path, timeout=15, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._poll_interval = poll_interval
        self._seen = self._version()

    def _version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            version = self._version()
            if version != self._seen:
                self._seen = version
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self._poll_interval)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresWorkSignal:
    def __init__(self, dsn: str) -> None:
        import psycopg

        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def wait(self, timeout: float) -> bool:
        woken = any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
        if woken:
            # One wake-up for a burst: drop the notifications that queued up meanwhile.
            for _ in self._conn.notifies(timeout=0.0):
                pass
        return woken

    def close(self) -> None:
        self._conn.close()


def open_work_signal(db: Database) -> WorkSignal:
    if db.is_sqlite:
        return SQLiteWorkSignal(db.url.database or ":memory:")
    dsn = db.url.set(drivername="postgresql").render_as_string(hide_password=False)
    return PostgresWorkSignal(dsn)
