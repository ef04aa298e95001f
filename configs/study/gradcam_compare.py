"""Grad-CAM of the same query photos under several models of one species, side by side.

    python configs/study/gradcam_compare.py --out FIGURE.png LABEL=ARTIFACT [LABEL=ARTIFACT ...]

The query photos are test individuals of the first artifact's split (recomputed from its model
card), so none of them was seen in training by a model trained on that split. Per individual, one
query photo is explained against one enrolled photo of the same individual (the study's protocol:
the target is the cosine similarity to the reference's embedding, computed by each model itself).
The first row shows the photos; each further row one model.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from PIL import Image

from training.artifact import ModelCard, load_artifact
from training.data import enrol_query_split
from training.gradcam import gradcam_grid, gradcam_map, overlay
from training.pipeline import held_out
from training.preprocess import PreprocessSpec, normalize, open_image, to_uint8_tensor

SHOWN_SIZE = 128


def test_photos(card: ModelCard, count: int, seed: int) -> tuple[list[str], list[tuple[Path, Path]]]:
    """(individual, (query path, enrolled path)) for ``count`` test individuals of the card's split."""
    samples = held_out(card).samples
    test = {s.individual for s in samples}
    enrol, query = enrol_query_split(
        [s.individual for s in samples], [s.group for s in samples], random.Random(seed)
    )
    chosen = sorted(random.Random(seed).sample(sorted(test), count))
    pairs = []
    for individual in chosen:
        q = next(samples[i].path for i in query if samples[i].individual == individual)
        e = next(samples[i].path for i in enrol if samples[i].individual == individual)
        pairs.append((q, e))
    return chosen, pairs


def pixels(path: Path, spec: PreprocessSpec) -> torch.Tensor:
    """The shared preprocessing's uint8 (3, H, W) input for one photo."""
    return to_uint8_tensor(open_image(path, size=spec.input_size), spec)


def explained(artifact: Path, pairs: list[tuple[Path, Path]]) -> list[Image.Image]:
    """Each query photo's heatmap towards its reference photo, under one model (at its input size)."""
    loaded = load_artifact(artifact)
    spec = loaded.card.preprocess
    out = []
    for query_path, reference_path in pairs:
        query = pixels(query_path, spec)
        reference_emb = loaded.model.embed(normalize(pixels(reference_path, spec), spec).unsqueeze(0))[0]
        cam = gradcam_map(loaded.model, normalize(query, spec), reference_emb)
        out.append(overlay(shown(query), cam))
    return out


def shown(uint8: torch.Tensor) -> Image.Image:
    image = Image.fromarray(uint8.permute(1, 2, 0).numpy())
    return image.resize((SHOWN_SIZE, SHOWN_SIZE * image.height // image.width), Image.Resampling.BILINEAR)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", metavar="LABEL=ARTIFACT", help="row label and artifact folder")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--count", type=int, default=6, help="test individuals shown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = [(label, Path(path)) for label, path in (m.split("=", 1) for m in args.models)]
    first = load_artifact(models[0][1]).card
    individuals, pairs = test_photos(first, args.count, args.seed)
    photos = [shown(pixels(q, first.preprocess)) for q, _ in pairs]
    rows = [("query photo", photos)] + [(label, explained(path, pairs)) for label, path in models]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gradcam_grid(rows, individuals).save(args.out)
    print(f"wrote {args.out}: {len(individuals)} individuals x {len(models)} models")


if __name__ == "__main__":
    main()
