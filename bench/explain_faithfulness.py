"""Faithfulness of the explanation heat maps: deletion curves on a dog model and the demo photos.

For every demo query and every gallery photo of the same individual, in both directions (each photo
explained against the other's embedding), the photo's pixels are hidden (set to the normalisation's
mean grey) in 16 steps, hottest first by a heat map, and the cosine similarity to the other photo is
taken at each step. A faithful map lowers the similarity faster than hiding pixels in a random order:
a smaller area under the curve. Prints the mean area per map (and of random orders), and how many
maps were all zero (nothing raised the similarity: an all-dark picture).

    python bench/explain_faithfulness.py                                # the shipped demo dog model
    python bench/explain_faithfulness.py --model tests/data/dog-resnet18  # the study's ResNet18
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from training.artifact import load_artifact
from training.gradcam import (
    curve_area,
    deletion_curve,
    display_map,
    gradcam_map,
    hottest_first,
    input_attribution_map,
    layercam_map,
)
from training.preprocess import open_image, preprocess

DEMO = Path(__file__).resolve().parents[1] / "service" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", type=Path, default=DEMO, help="demo folder (gallery, queries)")
    parser.add_argument(
        "--model", type=Path, default=None, help="dog model artifact (default: the demo's models/dog)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_artifact(args.model or args.demo / "models" / "dog")
    model, spec = loaded.model.float().eval(), loaded.card.preprocess
    maps: dict[str, Callable[[torch.Tensor, torch.Tensor], np.ndarray]] = {
        "gradient x input (served)": lambda x, r: input_attribution_map(model, x, r),
        "gradient x input as drawn (display_map)": lambda x, r: display_map(
            input_attribution_map(model, x, r)
        ),
        "Grad-CAM, model.gradcam_layer": lambda x, r: gradcam_map(model, x, r),
        "LayerCAM, model.fine_gradcam_layer": lambda x, r: layercam_map(model, x, r),
    }
    areas: dict[str, list[float]] = {name: [] for name in maps}
    random_areas: list[float] = []
    dark = dict.fromkeys(maps, 0)
    pairs = 0
    for query in sorted((args.demo / "queries").glob("*.jpg")):
        for enrolled in sorted((args.demo / "gallery" / query.stem).glob("*.jpg")):
            photos = [preprocess(open_image(path), spec) for path in (query, enrolled)]
            with torch.no_grad():
                embeddings = model.embed(torch.stack(photos))
            for image, other in ((photos[0], embeddings[1]), (photos[1], embeddings[0])):
                pairs += 1
                rng = np.random.default_rng(pairs)
                for name, heat_map in maps.items():
                    heat = heat_map(image, other)
                    dark[name] += int(heat.max() == 0.0)
                    order = hottest_first(heat, rng)
                    areas[name].append(curve_area(deletion_curve(model, image, other, order)))
                pixels = image.shape[1] * image.shape[2]
                shuffled = [deletion_curve(model, image, other, rng.permutation(pixels)) for _ in range(3)]
                random_areas.append(float(np.mean([curve_area(c) for c in shuffled])))
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    print(f"# {when}, {platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    print(f"# model {loaded.card.model_version}, {pairs} explained photos, 16 deletion steps")
    print("| map | deletion AUC (mean) | photos the map beats random on | all-zero maps |")
    print("|---|---|---|---|")
    for name, values in areas.items():
        beats = sum(v < r for v, r in zip(values, random_areas, strict=True))
        print(f"| {name} | {np.mean(values):.4f} | {beats}/{pairs} | {dark[name]} |")
    print(f"| random order (3 per photo) | {np.mean(random_areas):.4f} | | |")


if __name__ == "__main__":
    main()
