"""Alembic migrations: upgrade, downgrade and upgrade again, and a schema equal to the ORM models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from apps import make_settings
from sqlalchemy import create_engine, inspect

from service.app import create_app
from service.db import migrate
from service.db.models import Base
from service.errors import ConfigurationError

TABLES = {
    "species",
    "model_versions",
    "individuals",
    "images",
    "embeddings",
    "audit_log",
    "review_items",
    "jobs",
    "index_changes",
}


def schema_diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    assert tables(database_url) == TABLES
    assert schema_diff(database_url) == []


def test_downgrade_removes_everything_and_upgrade_restores_it(database_url: str) -> None:
    migrate.downgrade(database_url, "base")
    assert tables(database_url) == set()
    migrate.upgrade(database_url)
    assert tables(database_url) == TABLES
    assert schema_diff(database_url) == []


def test_every_revision_has_a_downgrade_and_one_head() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        source = Path(revision.path).read_text()
        assert "def downgrade() -> None:" in source
        assert "pass\n" not in source.split("def downgrade() -> None:")[1][:40], (
            f"{revision.revision} is irreversible"
        )


def test_the_app_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    settings = make_settings(url, tmp_path, tmp_path / "models")
    from fastapi.testclient import TestClient

    with pytest.raises(ConfigurationError, match="animalid migrate"), TestClient(create_app(settings)):
        pass
