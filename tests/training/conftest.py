"""Fixtures of the training-package tests: synthetic embeddings and a tiny random model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from synthetic import make_folder_dataset

from training.model import EmbeddingNet

Clusters = tuple[np.ndarray, np.ndarray, np.ndarray]


def make_clusters(
    n_individuals: int,
    per_individual: int,
    *,
    dim: int = 32,
    noise: float = 0.05,
    seed: int = 0,
    frames_per_group: int = 1,
    prefix: str = "id",
) -> Clusters:
    """L2-normalised embeddings around one random centre per individual: (emb, individuals, groups).

    ``noise`` is the per-dimension spread around a unit centre (large = no structure at all);
    consecutive images of an individual share a group ``frames_per_group`` at a time.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_individuals, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.repeat(centres, per_individual, axis=0) + noise * rng.normal(
        size=(n_individuals * per_individual, dim)
    )
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    individuals = np.repeat([f"{prefix}{i:03d}" for i in range(n_individuals)], per_individual)
    frame = np.tile(np.arange(per_individual), n_individuals)
    groups = np.array(
        [f"{ind}/clip{f // frames_per_group}" for ind, f in zip(individuals, frame, strict=True)]
    )
    return emb, individuals, groups


@pytest.fixture(scope="session")
def clusters() -> Callable[..., Clusters]:
    return make_clusters


@pytest.fixture(scope="module")
def tiny_model() -> EmbeddingNet:
    """A randomly initialised EmbeddingNet (seeded), in eval mode, on the CPU."""
    torch.manual_seed(0)
    return EmbeddingNet(embedding_dim=32).eval()


@pytest.fixture(scope="module")
def animals(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A folder dataset of 14 synthetic animals, 6 photos each at 48 px (test_train has its own at 32)."""
    return make_folder_dataset(tmp_path_factory.mktemp("animals"), n_individuals=14, n_images=6, size=48)
