"""Faithfulness of the explanation maps on the study's ResNet18 dog model and the demo photos.

The model is ``dogs-arcface-112-aug`` (``tests/data/dog-resnet18``), the demo model until the
ImageNet EfficientNet-Lite2 replaced it: on the Lite2 model no map tried beats random deletion orders
(docs/results.md, "Explanation maps"), so this checks the maps' code where the property holds.

Deletion curves (training.gradcam.deletion_areas): hiding a photo's pixels hottest first must lower
its similarity to the other photo faster than hiding them in random orders. docs/results.md reports
the full run (bench/explain_faithfulness.py: every gallery photo, more maps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.artifact import load_artifact
from training.gradcam import (
    curve_area,
    deletion_areas,
    deletion_curve,
    gradcam_map,
    hottest_first,
    layercam_map,
)
from training.preprocess import open_image, preprocess

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "service" / "demo"
STUDY_MODEL = ROOT / "tests" / "data" / "dog-resnet18"


@pytest.fixture(scope="module")
def areas() -> dict[str, list[float]]:
    """Deletion areas of the served map, the last stage's Grad-CAM and random orders, for each demo
    query and its individual's first gallery photo, each photo explained against the other."""
    loaded = load_artifact(STUDY_MODEL)
    model, spec = loaded.model.eval(), loaded.card.preprocess
    found: dict[str, list[float]] = {"served": [], "coarse": [], "random": [], "dark": []}
    for n, query in enumerate(sorted((DEMO / "queries").glob("*.jpg"))):
        enrolled = sorted((DEMO / "gallery" / query.stem).glob("*.jpg"))[0]
        photos = [preprocess(open_image(path), spec) for path in (query, enrolled)]
        embeddings = model.embed(torch.stack(photos))
        for image, other in ((photos[0], embeddings[1]), (photos[1], embeddings[0])):
            served = layercam_map(model, image, other)
            hot, random = deletion_areas(model, image, other, served, seed=n)
            coarse_order = hottest_first(gradcam_map(model, image, other), np.random.default_rng(n))
            coarse = curve_area(deletion_curve(model, image, other, coarse_order))
            found["served"].append(hot)
            found["coarse"].append(coarse)
            found["random"].append(random)
            found["dark"].append(float(served.max() == 0.0))
    assert len(found["served"]) == 16
    return found


def test_hiding_the_hottest_pixels_lowers_the_similarity_faster_than_random(areas):
    served, random = np.mean(areas["served"]), np.mean(areas["random"])
    assert served < random - 0.05, (served, random)
    assert sum(h < r for h, r in zip(areas["served"], areas["random"], strict=True)) >= 12


def test_the_served_map_is_more_faithful_than_the_last_stage_grad_cam(areas):
    assert np.mean(areas["served"]) < np.mean(areas["coarse"])
    assert sum(areas["dark"]) == 0, "no all-dark map"
