"""Service test fixtures: tiny random model artifacts, settings, and apps under ``TestClient``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from apps import ADMIN, AppRunner, TestClient, build_artifact, make_models_dir, make_settings
from databases import BACKENDS, provisioned_database

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """dog (calibrated threshold), cat (no threshold: the settings default applies; portrait input,
    like the cow crops), dog_v2 (new weights), dog_lite (an EfficientNet-Lite0 dog model)."""
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "dog": build_artifact(root / "dog", "dog", seed=0),
        "cat": build_artifact(root / "cat", "cat", seed=1, threshold=None, input_size=(64, 32)),
        "dog_v2": build_artifact(root / "dog_v2", "dog", seed=2),
        "dog_lite": build_artifact(root / "dog_lite", "dog", seed=3, backbone="efficientnet_lite0"),
    }


@pytest.fixture
def service_root(tmp_path: Path, artifacts: dict[str, Path]) -> Path:
    make_models_dir(tmp_path, artifacts, dog="dog", cat="cat")
    return tmp_path


@pytest.fixture
def settings(database_url: str, service_root: Path) -> Settings:
    return make_settings(database_url, service_root, service_root / "models")


@pytest.fixture
def runner() -> Iterator[AppRunner]:
    """Start and stop apps inside a test (restarts); all are stopped at teardown."""
    started = AppRunner()
    yield started
    started.stop_all()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A fresh app on a fresh database (both backends); admin key by default."""
    with TestClient(create_app(settings), headers=ADMIN) as c:
        yield c


@pytest.fixture(scope="module", params=BACKENDS)
def shared_client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path]
) -> Iterator[TestClient]:
    """One app per test module and backend, for tests that only add their own individuals."""
    root = tmp_path_factory.mktemp(f"shared-{request.param}")
    make_models_dir(root, artifacts, dog="dog", cat="cat")
    with provisioned_database(str(request.param), root) as url:
        settings = make_settings(url, root, root / "models")
        with TestClient(create_app(settings), headers=ADMIN) as c:
            yield c
