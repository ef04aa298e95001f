"""Where tests find the real data sets: ``$ANIMALID_SHARED_DATA``, by default ``../shared/data``
beside the clone (one folder per data set, each with its ``manifest.csv``). Tests that need one
skip, saying where they looked, when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("ANIMALID_SHARED_DATA") or ROOT.parent / "shared" / "data")


def shared_manifest(dataset: str) -> Path:
    """``<shared data>/<dataset>/manifest.csv``; skips the test when it is not there."""
    manifest = shared_data_dir() / dataset / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"{dataset} not found at {manifest} (set ANIMALID_SHARED_DATA)")
    return manifest
