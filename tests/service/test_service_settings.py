"""Settings: one ANIMALID_ prefix, the documented defaults, validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.runtime import batch_lanes, batch_max_images
from service.settings import Settings
from training.open_set import MATCH_CONFIDENCE_FLOORS, REPORTED_FLOOR


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("ANIMALID_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env around


def test_defaults_are_the_embedded_ones() -> None:
    settings = Settings()
    assert settings.database_url == "sqlite:///./var/animalid.db"
    assert settings.models_dir == Path("var/models") and settings.image_store_dir == Path("var/images")
    assert settings.device == "auto"
    assert settings.max_upload_bytes == 10 * 1024 * 1024 and settings.max_image_pixels == 40_000_000
    assert settings.auth_disabled is False and len(settings.keyring) == 0


def test_environment_overrides_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANIMALID_DATABASE_URL", "postgresql+psycopg://u@db:5432/animalid")
    monkeypatch.setenv("ANIMALID_DEVICE", "cpu")
    monkeypatch.setenv("ANIMALID_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("ANIMALID_API_KEYS", "abcdefgh1:read,abcdefgh2:admin")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///ignored.db")  # no prefix: not ours
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u@db:5432/animalid"
    assert (settings.device, settings.max_upload_bytes, len(settings.keyring)) == ("cpu", 1234, 2)
    assert "abcdefgh1" not in repr(settings)  # the keys are a secret


def test_the_env_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ANIMALID_PORT=9123\nANIMALID_AUTH_DISABLED=true\n")
    settings = Settings()
    assert settings.port == 9123 and settings.auth_disabled is True


INVALID = [
    ("DEVICE", "tpu"),
    ("MAX_UPLOAD_BYTES", "0"),
    ("DEFAULT_THRESHOLD", "1.5"),
    ("PORT", "70000"),
    # the open-set settings and their per-species maps share their bounds
    ("TARGET_FPIR", "0"),
    ("TARGET_FPIR_BY_SPECIES", '{"cattle": 1.0}'),
    ("STRANGER_SHARE_BY_SPECIES", '{"cattle": 1.0}'),
    ("MIN_MATCH_CONFIDENCE", "1.2"),
    ("MIN_MATCH_CONFIDENCE_BY_SPECIES", '{"cattle": -0.1}'),
]


def test_per_species_open_set_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANIMALID_MIN_MATCH_CONFIDENCE_BY_SPECIES", '{"cattle": 0.7, "dog": 0}')
    monkeypatch.setenv("ANIMALID_STRANGER_SHARE_BY_SPECIES", '{"cattle": 0}')
    settings = Settings()
    assert settings.min_match_confidence == 0.5
    assert settings.min_match_confidence_by_species == {"cattle": 0.7, "dog": 0.0}
    assert settings.stranger_share_by_species == {"cattle": 0.0}


def test_the_default_minimum_confidence_is_the_floor_the_training_report_prints() -> None:
    # the card holds thresholds for it, and the report and `animalid calibrate` show them
    assert Settings().min_match_confidence == REPORTED_FLOOR
    assert REPORTED_FLOOR in MATCH_CONFIDENCE_FLOORS


@pytest.mark.parametrize("name,value", INVALID)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"ANIMALID_{name}", value)
    with pytest.raises(ValidationError):
        Settings()


def test_batching_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unset (0): small batches and one lane per share of the cores on the CPU; large batches and one
    # lane on a GPU. Set: as set.
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    settings = Settings()
    assert (batch_max_images(settings, cpu), batch_lanes(settings, cpu)) == (8, 2)
    assert (batch_max_images(settings, cuda), batch_lanes(settings, cuda)) == (32, 1)
    monkeypatch.setenv("ANIMALID_BATCH_MAX_IMAGES", "16")
    monkeypatch.setenv("ANIMALID_BATCH_LANES", "3")
    chosen = Settings()
    assert (batch_max_images(chosen, cpu), batch_lanes(chosen, cpu)) == (16, 3)
    assert (batch_max_images(chosen, cuda), batch_lanes(chosen, cuda)) == (16, 3)
