"""Grad-CAM explanations: which parts of the query image drive its similarity to a reference."""

from __future__ import annotations

import base64
import io
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from service.metrics import Metrics
from service.ml.images import ImagePolicy
from service.ml.registry import Registry
from service.schemas import ExplainResult
from service.services.identification import compare
from training.gradcam import overlay
from training.preprocess import REDUCING_GAP


@dataclass(frozen=True)
class Explanation:
    species: str
    model_version: str
    similarity: float
    individual_id: uuid.UUID | None
    reference_image_id: uuid.UUID | None
    heatmap: np.ndarray  # (H, W) float32 in [0, 1]
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
            heatmap=np.round(self.heatmap.astype(np.float64), 4).tolist(),
            overlay_png=base64.b64encode(self.overlay_png).decode("ascii"),
        )


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    """The query image scaled down so its longest side is at most ``max_side`` (never up)."""
    scale = max_side / max(image.size)
    if scale >= 1.0:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def explain(
    session: Session,
    registry: Registry,
    metrics: Metrics,
    images: ImagePolicy,
    max_side: int,
    species: str,
    image: bytes,
    individual_id: uuid.UUID | None,
    reference_image: bytes | None,
) -> Explanation:
    # Decoded no smaller than the overlay (open_image keeps REDUCING_GAP times the size it is given).
    overlay_side = -(-max_side // REDUCING_GAP)
    found = compare(
        session, registry, metrics, images, species, image, individual_id, reference_image, overlay_side
    )
    with metrics.time_inference(species, "gradcam"):
        cam = found.serving.embedder.gradcam(found.image.image, found.reference)
    picture = overlay(_fit(found.image.image, max_side), cam)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return Explanation(
        species=species,
        model_version=found.serving.model_version,
        similarity=found.similarity,
        individual_id=individual_id,
        reference_image_id=found.reference_image_id,
        heatmap=np.asarray(cam, dtype=np.float32),
        overlay_png=buffer.getvalue(),
    )
