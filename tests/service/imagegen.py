"""Synthetic photos for the service tests: each individual is a seeded block pattern, each of its
photos that pattern with a little seeded noise."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pattern(seed: int, size: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return np.asarray(
        Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST), dtype=np.float32
    )


def photo(individual: int, shot: int = 0, size: int = 80) -> Image.Image:
    """Photo ``shot`` of ``individual``: shot 0 is the bare pattern, others add seeded noise."""
    base = pattern(individual, size)
    if shot:
        base = base + np.random.default_rng(10_000 * individual + shot).normal(0, 6, size=base.shape)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg(individual: int, shot: int = 0, size: int = 80) -> bytes:
    return encode(photo(individual, shot, size), "JPEG", quality=95)
