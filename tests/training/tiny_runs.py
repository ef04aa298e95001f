"""The training configuration of the package's tests: tiny images, a small embedding, a few
individuals held out, one thread. Each test overrides what it is about."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import TrainConfig, build_config


def tiny_config(root: Path, data_dirs: dict[str, Path], **overrides: Any) -> TrainConfig:
    """A run writing under ``root``, on the folder datasets ``{species: folder}``."""
    values = {
        "name": "t",
        "datasets": [{"source": str(d), "species": s} for s, d in data_dirs.items()],
        "out_dir": str(root / "runs"),
        "cache_dir": str(root / "cache"),
        "input_size": 32,
        "embedding_dim": 32,
        "batch_size": 16,
        "epochs": 3,
        "lr": 0.05,
        "scale": 16.0,
        "margin": 0.2,
        "val_fraction": 0.15,
        "test_fraction": 0.15,
        "eval_repeats": 3,
        "threads": 1,
    }
    return build_config(values | overrides)
