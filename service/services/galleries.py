"""Loading species models and building their galleries from the database (start-up and reloads)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from service.db.repository import Repository, vector_from_bytes
from service.ml.ann import IndexPlan
from service.ml.embedder import Embedder
from service.ml.gallery import Gallery, GalleryEntry
from training.artifact import ArtifactError, load_artifact

log = logging.getLogger(__name__)


def discover_artifacts(models_dir: Path) -> dict[str, Path]:
    """``<models_dir>/<species>/`` folders, by species name."""
    if not models_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(models_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def load_embedder(
    species: str, path: Path, device: torch.device, warmup: bool, batch: int = 1, trace: bool = True
) -> Embedder:
    """Load and warm up one artifact (tracing its forward pass when ``trace``, measuring its speed-up
    at ``batch`` above 1, see :meth:`Embedder.warmup`); :class:`ArtifactError` says why it cannot serve."""
    loaded = load_artifact(path, device)
    if loaded.card.species != species:
        raise ArtifactError(
            f"the model card is for species {loaded.card.species!r} but the folder is {species!r} (to "
            f"serve it for {species!r}, write a relabelled copy: animalid calibrate ARTIFACT --as-species "
            f"{species} --dataset PHOTOS:{species} --out DIR)"
        )
    embedder = Embedder(loaded, device)
    if warmup:
        embedder.warmup(batch, trace)
    return embedder


def build_gallery(
    sessions: sessionmaker[Session],
    model_version_id: int,
    dim: int,
    use_gpu: bool | None,
    plan: IndexPlan | None = None,
) -> Gallery:
    """The index of every stored embedding of one model version, added in id order, then exact or
    approximate by ``plan`` (the approximate index is built once, from all of them)."""
    gallery = Gallery(dim, use_gpu=use_gpu)
    with sessions() as session:
        for rows in Repository(session).iter_gallery(model_version_id):
            vectors = np.stack([vector_from_bytes(row.vector) for row in rows])
            if vectors.shape[1] != dim:
                raise ValueError(f"stored embeddings have {vectors.shape[1]} dimensions, the model {dim}")
            gallery.add(
                [row.embedding_id for row in rows],
                vectors,
                [GalleryEntry(image_id=row.image_id, individual_id=row.individual_id) for row in rows],
            )
    if plan is not None:
        gallery.set_plan(plan)
    return gallery
