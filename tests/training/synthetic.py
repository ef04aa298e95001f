"""Synthetic identity datasets written to disk: each individual is a fixed random colour pattern,
each of its photos a shifted, noisy copy, so a model can learn them in a few steps."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def individual_pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )


def make_photo(pattern: np.ndarray, rng: np.random.Generator) -> Image.Image:
    shift = rng.integers(-3, 4, size=2)
    img = np.roll(pattern, tuple(shift), axis=(0, 1)) + rng.normal(0, 12, size=pattern.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_folder_dataset(
    root: Path, n_individuals: int = 12, n_images: int = 6, size: int = 48, seed: int = 0, grey: bool = False
) -> Path:
    """root/<individual>/<clip>_<n>.png; two 'clips' per individual for group tests."""
    rng = np.random.default_rng(seed)
    for ind in range(n_individuals):
        pattern = individual_pattern(rng, size)
        folder = root / f"ind{ind:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n_images):
            img = make_photo(pattern, rng)
            if grey:
                img = img.convert("L")
            img.save(folder / f"clip{k % 2}_{k:03d}.png")
    return root


def write_manifest(root: Path, species: str = "testanimal") -> Path:
    """A manifest.csv over a folder dataset made by :func:`make_folder_dataset`."""
    path = root / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "individual", "species"])
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for img in sorted(folder.iterdir()):
                writer.writerow([f"{folder.name}/{img.name}", folder.name, species])
    return path
