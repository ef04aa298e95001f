"""Two networks trained on different data, fused: the study protocol for each alone, for their
concatenation and for their compact bilinear pooling.

    python configs/study/fusion.py ARTIFACT_A ARTIFACT_B

Both artifacts must be of the same species and split (same data set, seed and fractions), so the
test individuals are unseen by both. Each embedding is L2-normalised first. Concatenation with
weight w (sqrt(w) * a, sqrt(1 - w) * b) scores a pair by w * cos_a + (1 - w) * cos_b; w = 0.5, and
the w of 0.1 ... 0.9 that gives the best top-1 on the validation individuals (never the test ones).
Compact bilinear pooling is the Tensor Sketch of the outer product a b^T (8,192-D, a fixed seed):
its inner products approximate cos_a * cos_b. Prints one Markdown row per variant.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from training.artifact import LoadedModel, load_artifact
from training.data import Shard, enrol_query_split
from training.evaluate import embed_pixels
from training.metrics import identification_ranks, similarity, topk_accuracy
from training.pipeline import card_config, run_protocols
from training.train import SpeciesData, prepare_data

SKETCH_DIM = 8192
Embed = Callable[[Shard], np.ndarray]


def species_data(loaded: LoadedModel) -> SpeciesData:
    config = card_config(loaded.card)
    config = replace(
        config, datasets=tuple(d for d in config.datasets if d.species in (None, loaded.card.species))
    )
    (data,) = [d for d in prepare_data(config, loaded.card.preprocess) if d.species == loaded.card.species]
    return data


def embedder(loaded: LoadedModel, data: SpeciesData) -> Embed:
    """Embeddings of a shard's photos (matched by path) with this artifact's own input size."""
    rows = {path: (shard, i) for shard in (data.val, data.test) for i, path in enumerate(shard.paths)}
    cache: dict[str, np.ndarray] = {}

    def embed(shard: Shard) -> np.ndarray:
        missing = [p for p in shard.paths if p not in cache]
        if missing:
            pixels = torch.stack([rows[p][0].pixels[rows[p][1]] for p in missing])
            for path, e in zip(
                missing, embed_pixels(loaded.model, pixels, loaded.card.preprocess, "cpu"), strict=True
            ):
                cache[path] = e
        return np.stack([cache[p] for p in shard.paths])

    return embed


def concatenated(a: Embed, b: Embed, weight: float) -> Embed:
    return lambda shard: np.hstack([np.sqrt(weight) * a(shard), np.sqrt(1 - weight) * b(shard)])


def tensor_sketch(a: Embed, b: Embed, dim: int = SKETCH_DIM, seed: int = 0) -> Embed:
    """Compact bilinear pooling (Gao et al., 2016): FFT-convolved count sketches of the two embeddings."""
    sketches: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def count_sketch(x: np.ndarray, key: int) -> np.ndarray:
        if key not in sketches:
            rng = np.random.default_rng([seed, key])
            sketches[key] = (rng.integers(dim, size=x.shape[1]), rng.choice([-1.0, 1.0], size=x.shape[1]))
        h, s = sketches[key]
        out = np.zeros((len(x), dim))
        np.add.at(out.T, h, (x * s).T)
        return out

    def embed(shard: Shard) -> np.ndarray:
        fa, fb = np.fft.rfft(count_sketch(a(shard), 0)), np.fft.rfft(count_sketch(b(shard), 1))
        z = np.fft.irfft(fa * fb, n=dim)
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)

    return embed


def validation_top1(embed: Embed, val: Shard, seed: int) -> float:
    emb, labels = embed(val), np.array(val.individuals)
    enrol, query = enrol_query_split(val.individuals, val.groups, random.Random(seed))
    return topk_accuracy(
        identification_ranks(similarity(emb[query], emb[enrol]), labels[query], labels[enrol]), 1
    )


def main(path_a: str, path_b: str) -> None:
    loaded_a, loaded_b = load_artifact(path_a, "cpu"), load_artifact(path_b, "cpu")
    data_a, data_b = species_data(loaded_a), species_data(loaded_b)
    if sorted(data_a.test.paths) != sorted(data_b.test.paths) or sorted(data_a.val.paths) != sorted(
        data_b.val.paths
    ):
        sys.exit("the two artifacts were not trained on the same split: their test individuals differ")
    config = card_config(loaded_a.card)
    a, b = embedder(loaded_a, data_a), embedder(loaded_b, data_b)
    weights = [round(w, 1) for w in np.arange(0.1, 1.0, 0.1)]
    val_top1 = {w: validation_top1(concatenated(a, b, w), data_a.val, config.seed) for w in weights}
    best = max(val_top1, key=val_top1.__getitem__)
    print(
        "validation top-1 of the concatenation by weight of A: "
        + ", ".join(f"{w}: {t:.3f}" for w, t in val_top1.items())
    )
    variants = {
        f"A: {loaded_a.card.model_version} ({loaded_a.card.architecture})": a,
        f"B: {loaded_b.card.model_version} ({loaded_b.card.architecture})": b,
        "concatenation, w = 0.5": concatenated(a, b, 0.5),
        f"concatenation, w = {best} (best on validation)": concatenated(a, b, best),
        f"compact bilinear ({SKETCH_DIM}-D Tensor Sketch)": tensor_sketch(a, b),
    }
    header = [
        "variant",
        "dims",
        "top-1",
        "top-5",
        "mAP",
        "TAR@FAR1e-3",
        "EER",
        "unknown AUROC",
        "pair verification",
    ]
    print(
        "| " + " | ".join([*header, "one-shot rank-1 / rank-5"]) + " |\n" + "|---" * (len(header) + 1) + "|"
    )
    for name, embed in variants.items():
        evaluation, paper = run_protocols(embed, config, data_a.val, data_a.test, None)
        result = evaluation.summary()
        cells = [
            name,
            str(embed(data_a.val.take([0])).shape[1]),
            f"{result['top1']:.3f} ± {result['top1_std']:.3f}",
            *(f"{result[key]:.3f}" for key in ("top5", "map", "tar_at_far_0.001", "eer", "open_set_auroc")),
            f"{paper['pair_verification_accuracy']:.3f}",
            f"{paper['one_shot_rank1']:.3f} / {paper['one_shot_rank5']:.3f}"
            f" ± {paper['one_shot_rank5_std']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
