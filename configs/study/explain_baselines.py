"""Deletion areas on the shipped Lite2 dog model against two random baselines: random pixels and
random 16-pixel cells (the served LayerCAM map's own cell size at 260 px).

Hiding scattered pixels lowers an ImageNet network's similarity faster than hiding the same share
in contiguous cells, so a map, whose hot pixels come in blobs, is compared here with random orders
of the same granularity as well. Also an occlusion map (the similarity drop when a 64-pixel grey
square hides each region, stride 32), a map made for this measure. The first four demo queries and
their dogs' first gallery photos, each explained against the other's embedding (8 photos); all eight
queries (16 photos) with an argument of 8.

    python configs/study/explain_baselines.py [QUERIES]      # from the repository root
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.artifact import load_artifact
from training.gradcam import curve_area, deletion_areas, deletion_curve, hottest_first, layercam_map
from training.model import EmbeddingModel
from training.preprocess import open_image, preprocess

DEMO = Path(__file__).resolve().parents[2] / "service" / "demo"
PATCH, STRIDE, CELL, QUERIES = 64, 32, 16, 4


@torch.no_grad()
def occlusion_map(model: EmbeddingModel, image: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Mean similarity drop over the grey squares covering each pixel (negative drops count 0)."""
    height, width = image.shape[1:]
    ref = F.normalize(reference.flatten(), dim=0)
    base = float(F.normalize(model(image[None]), dim=1)[0] @ ref)
    ys = list(range(0, max(height - PATCH, 0) + 1, STRIDE))
    xs = list(range(0, max(width - PATCH, 0) + 1, STRIDE))
    ys += [height - PATCH] if ys[-1] + PATCH < height else []
    xs += [width - PATCH] if xs[-1] + PATCH < width else []
    boxes = [(y, x) for y in ys for x in xs]
    heat, count = torch.zeros(height, width), torch.zeros(height, width)
    for start in range(0, len(boxes), 32):
        chunk = boxes[start : start + 32]
        batch = image[None].repeat(len(chunk), 1, 1, 1)
        for i, (y, x) in enumerate(chunk):
            batch[i, :, y : y + PATCH, x : x + PATCH] = 0
        similarities = F.normalize(model(batch), dim=1) @ ref
        for (y, x), similarity in zip(chunk, similarities, strict=True):
            heat[y : y + PATCH, x : x + PATCH] += base - float(similarity)
            count[y : y + PATCH, x : x + PATCH] += 1
    return (heat / count.clamp(min=1)).clamp(min=0).numpy()


def random_cells(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A heat map of CELL x CELL squares with random distinct values: a random order of cells."""
    rows, cols = -(-height // CELL), -(-width // CELL)
    coarse = rng.permutation(rows * cols).reshape(rows, cols).astype(np.float64)
    return np.kron(coarse, np.ones((CELL, CELL)))[:height, :width]


def main() -> None:
    queries = int(sys.argv[1]) if len(sys.argv) > 1 else QUERIES
    torch.set_num_threads(1)
    loaded = load_artifact(DEMO / "models" / "dog")
    model, spec = loaded.model.eval(), loaded.card.preprocess
    areas: dict[str, list[float]] = {"occlusion": [], "LayerCAM (served)": [], "pixels": [], "cells": []}
    for n, query in enumerate(sorted((DEMO / "queries").glob("*.jpg"))[:queries]):
        enrolled = sorted((DEMO / "gallery" / query.stem).glob("*.jpg"))[0]
        photos = [preprocess(open_image(path), spec) for path in (query, enrolled)]
        with torch.no_grad():
            embeddings = model.embed(torch.stack(photos))
        for image, other in ((photos[0], embeddings[1]), (photos[1], embeddings[0])):
            occlusion = occlusion_map(model, image, other)
            order = hottest_first(occlusion, np.random.default_rng(n))
            areas["occlusion"].append(curve_area(deletion_curve(model, image, other, order)))
            served, pixels = deletion_areas(
                model, image, other, layercam_map(model, image, other), seed=n, random_orders=1
            )
            rng = np.random.default_rng(100 + n)
            order = hottest_first(random_cells(*image.shape[1:], rng), rng)
            areas["LayerCAM (served)"].append(served)
            areas["pixels"].append(pixels)
            areas["cells"].append(curve_area(deletion_curve(model, image, other, order)))
            print(query.name, {k: round(v[-1], 3) for k, v in areas.items()}, flush=True)
    print(f"\n{loaded.card.model_version}, {len(areas['cells'])} photos\n")
    print("| map | deletion area (mean) | photos below random cells |\n|---|---|---|")
    for name, values in areas.items():
        below = sum(v < c for v, c in zip(values, areas["cells"], strict=True))
        print(f"| {name} | {np.mean(values):.3f} | {below}/{len(values)} |")


if __name__ == "__main__":
    main()
