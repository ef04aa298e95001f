"""Deletion-curve areas of LayerCAM and Grad-CAM at four layers of the EfficientNet-Lite demo model.

Each demo query and its dog's first gallery photo, each explained against the other's embedding
(16 photos); random orders as in ``training.gradcam.deletion_areas``. Lower area: more faithful.

    python configs/study/explain_layers.py      # from the repository root
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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

DEMO = Path(__file__).resolve().parents[2] / "service" / "demo"


def main() -> None:
    loaded = load_artifact(DEMO / "models" / "dog")
    model, spec = loaded.model.eval(), loaded.card.preprocess
    trunk = model.backbone

    def last_of(stage: int) -> torch.nn.Module:
        return [b for b, s in zip(trunk._blocks, trunk.stage_of_block, strict=True) if s == stage][-1]

    layers = {"head": trunk.head_activation, "stage7": last_of(6), "stage6": last_of(5), "stage5": last_of(4)}
    areas: dict[str, list[float]] = {f"{m} {name}": [] for m in ("LayerCAM", "Grad-CAM") for name in layers}
    areas["random orders"] = []
    for n, query in enumerate(sorted((DEMO / "queries").glob("*.jpg"))):
        enrolled = sorted((DEMO / "gallery" / query.stem).glob("*.jpg"))[0]
        photos = [preprocess(open_image(path), spec) for path in (query, enrolled)]
        embeddings = model.embed(torch.stack(photos))
        for image, other in ((photos[0], embeddings[1]), (photos[1], embeddings[0])):
            for name, layer in layers.items():
                for method, make in (("LayerCAM", layercam_map), ("Grad-CAM", gradcam_map)):
                    order = hottest_first(make(model, image, other, layer), np.random.default_rng(n))
                    areas[f"{method} {name}"].append(curve_area(deletion_curve(model, image, other, order)))
            _, random_area = deletion_areas(model, image, other, layercam_map(model, image, other), seed=n)
            areas["random orders"].append(random_area)
    print(f"{loaded.card.model_version} ({loaded.card.architecture}), {len(areas['random orders'])} photos\n")
    print("| map | deletion area (mean) |\n|---|---|")
    for name, values in areas.items():
        print(f"| {name} | {np.mean(values):.3f} |")


if __name__ == "__main__":
    main()
