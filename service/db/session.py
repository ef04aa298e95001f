"""Engine and session factory. Created by the app's lifespan, never at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def ensure_sqlite_parent(url: str) -> None:
    """Create the folder of a SQLite database file (the embedded default lives under ./var)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit survives power loss too, not only a killed process.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def make_engine(url: str, lock_wait_seconds: float | None = None, **kwargs: Any) -> Engine:
    """``lock_wait_seconds``: how long a statement waits for a lock another connection holds before
    it fails (SQLite: 30 s when None; Postgres: for ever when None, as migrations want)."""
    if is_sqlite(url):
        ensure_sqlite_parent(url)
        timeout = 30.0 if lock_wait_seconds is None else lock_wait_seconds
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    if lock_wait_seconds is not None:
        # A row held by a process that hangs (paused, cut off before the server notices) would
        # otherwise keep a write waiting, and its process's write lock of the species, for ever.
        # Added to the URL's own options (a search_path, say), which connect_args would replace.
        given = make_url(url).query.get("options", ())
        options = [*([given] if isinstance(given, str) else given)]
        options.append(f"-c lock_timeout={max(1, round(lock_wait_seconds * 1000))}")
        kwargs.setdefault("connect_args", {})["options"] = " ".join(options)
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
