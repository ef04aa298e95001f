"""Run the Alembic migrations programmatically (``animalid migrate``, the demo and the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from service.db.session import ensure_sqlite_parent
from service.errors import ConfigurationError

REPO_ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = REPO_ROOT / "migrations"
ALEMBIC_INI = REPO_ROOT / "alembic.ini"


def alembic_config(database_url: str) -> Config:
    if not MIGRATIONS_DIR.is_dir():
        raise FileNotFoundError(f"migrations folder not found at {MIGRATIONS_DIR}")
    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.is_file() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    # The caller owns logging; alembic.ini's logging section is for the alembic command line.
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    ensure_sqlite_parent(database_url)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision(database_url: str) -> str | None:
    """The newest revision of the migrations shipped with this code (None without the folder)."""
    if not MIGRATIONS_DIR.is_dir():
        return None
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def require_head(engine: Engine, database_url: str) -> None:
    """Refuse a database the migrations have not brought to head, saying in one line what to run."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = head_revision(database_url)
    if current is None or (head is not None and current != head):
        raise ConfigurationError(
            f"the database schema is at revision {current or 'none'}, "
            f"this code needs {head or 'a migrated schema'}: "
            "run `animalid migrate` (with the same ANIMALID_DATABASE_URL) first"
        )
