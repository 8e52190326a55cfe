"""A migrated PostgreSQL database made for one run and dropped after it (tests and benches)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from storage.db import Database


@contextmanager
def throwaway_postgres(server_url: str, prefix: str = "atelier_tmp") -> Iterator[str]:
    """Create a database on the server at `server_url`, migrate it, yield its URL, drop it."""
    admin = create_engine(make_url(server_url), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        db = Database(url)
        db.upgrade()
        db.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
