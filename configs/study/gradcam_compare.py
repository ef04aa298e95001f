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

from training.artifact import load_artifact
from training.config import build_config
from training.data import Dataset, Sample, build_shard, enrol_query_split, load_dataset, split_individuals
from training.gradcam import gradcam_grid, gradcam_map, overlay
from training.preprocess import PreprocessSpec, normalize

SHOWN_SIZE = 128


def test_photos(artifact: Path, count: int, seed: int) -> tuple[list[str], list[tuple[Path, Path]]]:
    """(individual, (query path, enrolled path)) for ``count`` test individuals of the artifact's split."""
    card = load_artifact(artifact).card
    config = build_config(
        {k: v for k, v in card.training_config.items() if k not in ("epochs_trained", "run_dir")}
    )
    (dataset_cfg,) = [d for d in config.datasets if d.species == card.species]
    dataset = load_dataset(
        dataset_cfg.source,
        species=dataset_cfg.species,
        group_pattern=dataset_cfg.group_pattern,
        exclude_individuals=dataset_cfg.exclude_individuals,
    )
    split = split_individuals(
        dataset, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed
    )
    samples = [s for s in dataset.samples if s.individual in set(split.test)]
    enrol, query = enrol_query_split(
        [s.individual for s in samples], [s.group for s in samples], random.Random(seed)
    )
    chosen = sorted(random.Random(seed).sample(sorted(set(split.test)), count))
    pairs = []
    for individual in chosen:
        q = next(samples[i].path for i in query if samples[i].individual == individual)
        e = next(samples[i].path for i in enrol if samples[i].individual == individual)
        pairs.append((q, e))
    return chosen, pairs


def explained(artifact: Path, pairs: list[tuple[Path, Path]]) -> list[Image.Image]:
    loaded = load_artifact(artifact)
    spec: PreprocessSpec = loaded.card.preprocess
    shard_like = build_shard_from_paths([p for pair in pairs for p in pair], spec)
    images = [normalize(pixels, spec) for pixels in shard_like]
    out = []
    for k in range(len(pairs)):
        query, reference = images[2 * k], images[2 * k + 1]
        reference_emb = loaded.model.embed(reference.unsqueeze(0))[0]
        cam = gradcam_map(loaded.model, query, reference_emb)
        out.append(overlay(shown(shard_like[2 * k]), cam))
    return out


def build_shard_from_paths(paths: list[Path], spec: PreprocessSpec) -> list[torch.Tensor]:
    samples = tuple(
        Sample(path=p, individual=str(i), species="any", group=str(i), line=0) for i, p in enumerate(paths)
    )
    return list(build_shard(Dataset(samples, "gradcam"), spec).pixels)


def shown(pixels: torch.Tensor) -> Image.Image:
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
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
    individuals, pairs = test_photos(models[0][1], args.count, args.seed)
    spec = load_artifact(models[0][1]).card.preprocess
    photos = [shown(p) for p in build_shard_from_paths([q for q, _ in pairs], spec)]
    rows = [("query photo", photos)] + [(label, explained(path, pairs)) for label, path in models]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gradcam_grid(rows, individuals).save(args.out)
    print(f"wrote {args.out}: {len(individuals)} individuals x {len(models)} models")


if __name__ == "__main__":
    main()
