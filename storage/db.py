"""Engine, sessions and schema migrations for SQLite (WAL) and PostgreSQL."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 15_000
_WRITE_OPTION = "atelier_write"


class SchemaOutOfDate(RuntimeError):
    """The database schema is behind the code."""


class Database:
    """One engine per process; short transactions through `session()`."""

    def __init__(
        self, url: str, *, echo: bool = False, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
    ) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.engine = self._sqlite_engine(url, echo, busy_timeout_ms)
        else:
            self.engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=5)

    @staticmethod
    def _sqlite_engine(url: str, echo: bool, busy_timeout_ms: int) -> Engine:
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": busy_timeout_ms / 1000})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # Let us emit BEGIN ourselves so writers can take the lock up front.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock at BEGIN, so two writers never deadlock
            # upgrading read locks; busy_timeout then queues them.
            immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Connection]:
        """One Core transaction: commits when the block ends, rolls back on error."""
        with self.engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """One ORM transaction: commits when the block ends, rolls back on error."""
        with (
            self.transaction(write=write) as conn,
            Session(bind=conn, expire_on_commit=False) as session,
        ):
            yield session
            session.flush()

    @contextmanager
    def joined(self, session: Session | None) -> Iterator[Session]:
        """The caller's transaction when given one, else a new write transaction."""
        if session is not None:
            yield session
        else:
            with self.session(write=True) as own:
                yield own

    # --- migrations -------------------------------------------------------

    def _alembic_config(self) -> Config:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("sqlalchemy.url", self.url.render_as_string(hide_password=False))
        config.attributes["engine"] = self.engine
        return config

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self) -> None:
        """Apply pending migrations; safe when several processes start at once."""
        with self._migration_lock():
            if self.current_revision() != self.head_revision():
                command.upgrade(self._alembic_config(), "head")

    def check_current(self) -> None:
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaOutOfDate(
                f"The database schema is at {current or 'nothing'} but this Atelier needs "
                f"{head}. Run `atelier db upgrade`."
            )

    def prepare(self, *, auto_migrate: bool) -> None:
        """What each process does at start: apply migrations, or check them."""
        if auto_migrate:
            self.upgrade()
        else:
            self.check_current()

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self.is_sqlite:
            database = self.url.database
            if not database or database == ":memory:":
                yield
                return
            with open(f"{database}.migrate.lock", "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        else:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(725301)"))
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(725301)"))
                    conn.commit()

    def dispose(self) -> None:
        self.engine.dispose()
