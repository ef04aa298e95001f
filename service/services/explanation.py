"""Explanations: which parts of the query and of the reference photo drive their similarity."""

from __future__ import annotations

import base64
import io
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from service.db.repository import Repository
from service.errors import ImageNotFound
from service.image_store import ImageStore, ImageStoreError
from service.metrics import Metrics
from service.ml.images import ImagePolicy, decode_image
from service.ml.registry import Registry
from service.schemas import ExplainResult
from service.services.identification import Comparison, compare
from training.gradcam import explanation_panel
from training.preprocess import REDUCING_GAP


@dataclass(frozen=True)
class Explanation:
    species: str
    model_version: str
    similarity: float
    individual_id: uuid.UUID | None
    reference_image_id: uuid.UUID | None
    heatmap: np.ndarray  # (H, W) float32 in [0, 1]: the query's map
    reference_heatmap: np.ndarray  # (H, W) float32 in [0, 1]: the reference photo's map
    overlay_png: bytes

    def to_result(self) -> ExplainResult:
        return ExplainResult(
            species=self.species,
            model_version=self.model_version,
            similarity=self.similarity,
            individual_id=self.individual_id,
            reference_image_id=self.reference_image_id,
            height=int(self.heatmap.shape[0]),
            width=int(self.heatmap.shape[1]),
            heatmap=_rounded(self.heatmap),
            reference_heatmap=_rounded(self.reference_heatmap),
            overlay_png=base64.b64encode(self.overlay_png).decode("ascii"),
        )


def _rounded(heatmap: np.ndarray) -> list[list[float]]:
    return np.round(heatmap.astype(np.float64), 4).tolist()


def _reference(
    session: Session,
    store: ImageStore,
    images: ImagePolicy,
    size: tuple[int, int],
    found: Comparison,
    individual_id: uuid.UUID | None,
) -> tuple[Image.Image, str]:
    """The reference photo and how the picture names it: the individual and its image, or the photo."""
    if found.reference_photo is not None:
        return found.reference_photo.image, "the photo given"
    assert found.reference_image_id is not None and individual_id is not None
    repo = Repository(session)
    image = repo.get_image(found.reference_image_id)
    if image is None:  # deleted since the comparison read it
        raise ImageNotFound(
            f"image {found.reference_image_id} is gone", image_id=str(found.reference_image_id)
        )
    try:
        photo = decode_image(store.read(image.storage_path), images, size, field="reference_image").image
    except ImageStoreError as exc:
        raise ImageNotFound(
            f"the stored file of image {image.id} is missing", image_id=str(image.id)
        ) from exc
    external_id, name = repo.individual_labels([individual_id]).get(individual_id, (None, None))
    who = external_id or name or str(individual_id)
    return photo, f"{who}, image {str(image.id)[:8]}"


def explain(
    session: Session,
    registry: Registry,
    store: ImageStore,
    metrics: Metrics,
    images: ImagePolicy,
    max_side: int,
    species: str,
    image: bytes,
    individual_id: uuid.UUID | None,
    reference_image: bytes | None,
) -> Explanation:
    """The comparison :func:`compare` makes, with both photos' heat maps and the picture of them."""
    # Decoded no smaller than the picture (open_image keeps REDUCING_GAP times the size it is given).
    tile_side = -(-max_side // REDUCING_GAP)
    found = compare(
        session, registry, metrics, images, species, image, individual_id, reference_image, tile_side
    )
    embedder = found.serving.embedder
    height, width = embedder.card.preprocess.input_size
    size = (max(height, tile_side), max(width, tile_side))
    photo, label = _reference(session, store, images, size, found, individual_id)
    with metrics.time_inference(species, "gradcam"):
        query_vector = embedder.embed([found.image.image])[0]
        cam = embedder.heat_map(found.image.image, found.reference)
        reference_cam = embedder.heat_map(photo, query_vector)
    picture = explanation_panel(
        (found.image.image, cam), (photo, reference_cam), found.similarity, label, tile=max_side // 2
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return Explanation(
        species=species,
        model_version=found.serving.model_version,
        similarity=found.similarity,
        individual_id=individual_id,
        reference_image_id=found.reference_image_id,
        heatmap=np.asarray(cam, dtype=np.float32),
        reference_heatmap=np.asarray(reference_cam, dtype=np.float32),
        overlay_png=buffer.getvalue(),
    )
