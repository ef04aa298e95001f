"""Real test databases: a SQLite file, and a fresh schema on Postgres when it is reachable.

Database tests run on both backends. Each Postgres database is a fresh schema on the server at
``ANIMALID_TEST_POSTGRES_URL`` (default: postgres@127.0.0.1:5432/test), created by running the
Alembic migrations, and dropped afterwards. Without a reachable server the Postgres variants are
skipped and the run ends with a notice, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from service.db import migrate

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class PostgresState:
    checked: bool = False
    error: str | None = None
    skipped: int = 0


postgres_state = PostgresState()


def postgres_url() -> str:
    return os.environ.get("ANIMALID_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def libpq(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_error() -> str | None:
    """None when the server answers, else why not (checked once per run)."""
    if not postgres_state.checked:
        postgres_state.checked = True
        try:
            with psycopg.connect(libpq(postgres_url()), connect_timeout=3) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            lines = str(exc).strip().splitlines()
            postgres_state.error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return postgres_state.error


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_postgres() -> None:
    error = postgres_error()
    if error is None:
        return
    if in_ci():
        pytest.fail(f"CI is set and Postgres at {postgres_url()} is unreachable: {error}", pytrace=False)
    postgres_state.skipped += 1
    pytest.skip(f"Postgres at {postgres_url()} is unreachable: {error}")


@contextmanager
def provisioned_database(backend: str, folder: Path) -> Iterator[str]:
    """A migrated, empty database; yields its SQLAlchemy URL."""
    if backend == "sqlite":
        url = f"sqlite:///{folder / 'animalid.db'}"
        migrate.upgrade(url)
        yield url
        return
    with postgres_schema() as url:
        migrate.upgrade(url)
        yield url


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh, empty schema on the test server (not migrated); yields its SQLAlchemy URL."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = libpq(postgres_url())
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = (
        make_url(postgres_url())
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
