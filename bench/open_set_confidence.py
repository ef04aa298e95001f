"""Which confidence is calibrated: a check on an artifact's *validation* individuals only.

Fits the confidence on a random half of the validation individuals (galleries drawn as in
`animalid calibrate`, `training/open_set.py`) and measures its expected calibration error (ECE) on
galleries drawn the same way from the other half, for several random halvings:

* the curve on the best similarity alone (the confidence before `ConfidenceModel`);
* `ConfidenceModel` on the best similarity alone (the margin held at zero);
* `ConfidenceModel` on the best similarity and its margin over the second individual (now).

Each at the fitted share of stranger queries (strangers weighted to it), and for enrolled queries
alone with the share set to 0 (the curve has no share: its figure is at its own mix). The test
individuals are not read.

    python bench/open_set_confidence.py --data ../shared/data/dogfacenet/manifest.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.artifact import load_artifact
from training.calibration import _embed
from training.data import cached_shard
from training.open_set import ConfidenceModel, isotonic, query_scores, sampled_top2
from training.pipeline import card_config, split_part

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", type=Path, default=REPO / "service" / "demo" / "models" / "dog")
    parser.add_argument("--data", type=Path, required=True, help="where the card's training data lives")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="gallery sizes (images)")
    parser.add_argument("--halvings", type=int, default=6)
    parser.add_argument(
        "--embeddings",
        type=Path,
        help="an .npz of the validation embeddings: read when it exists, else written",
    )
    return parser.parse_args()


def validation_embeddings(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if args.embeddings is not None and args.embeddings.exists():
        saved = np.load(args.embeddings)
        return saved["emb"], saved["ind"], saved["grp"]
    loaded = load_artifact(args.artifact, "cpu")
    val = split_part(loaded.card, "val", args.data)
    shard = cached_shard(val, loaded.card.preprocess, card_config(loaded.card).cache_dir or None)
    emb, ind, grp = _embed(loaded, shard), np.array(shard.individuals), np.array(shard.groups)
    if args.embeddings is not None:
        np.savez(args.embeddings, emb=emb, ind=ind, grp=grp)
    return emb, ind, grp


def ece(confidence: np.ndarray, right: np.ndarray, weight: np.ndarray, bins: int = 10) -> float:
    """Ten equal-width bins, each bin's |mean confidence - share right| weighted by its weight."""
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            gap = np.average(confidence[m], weights=weight[m]) - np.average(right[m], weights=weight[m])
            total += weight[m].sum() / weight.sum() * abs(gap)
    return float(total)


def main() -> int:
    args = parse_args()
    emb, ind, grp = validation_embeddings(args)
    names = np.unique(ind)
    rows: dict[tuple[int, str], list[float]] = {}
    for split in range(args.halvings):
        half = set(np.random.default_rng(100 + split).permutation(names)[: len(names) // 2])
        fit = np.array([x in half for x in ind])
        fitted = query_scores(emb[fit], ind[fit], grp[fit], 0, 5)
        held = query_scores(emb[~fit], ind[~fit], grp[~fit], 1, 5)
        for n in args.sizes:
            best, second, right, stranger = drawn = sampled_top2(
                fitted, n / fitted.images_per_individual, np.random.default_rng(split)
            )
            b1, b2, br, bst = sampled_top2(
                held, n / held.images_per_individual, np.random.default_rng(50 + split)
            )
            model = ConfidenceModel.fit([drawn])
            flat = ConfidenceModel.fit([(best, best, right, stranger)])  # margin 0 everywhere
            share = model.stranger_share
            weight = np.where(bst, share / (1 - share) * (~bst).sum() / bst.sum(), 1.0)
            xs, ys = isotonic(best, right.astype(np.float64))
            known = ~bst
            confidences = {
                "curve on similarity (before)": (np.interp(b1, xs, ys), np.interp(b1[known], xs, ys)),
                "similarity only, by Bayes' rule": tuple(
                    np.array([flat.probability(0, x, x, p) for x in b])
                    for b, p in ((b1, share), (b1[known], 0.0))
                ),
                "similarity and margin, by Bayes' rule (now)": tuple(
                    np.array([model.probability(0, x, y, p) for x, y in zip(b, c, strict=True)])
                    for b, c, p in ((b1, b2, share), (b1[known], b2[known], 0.0))
                ),
            }
            for name, (mixed, alone) in confidences.items():
                rows.setdefault((n, name), []).append(ece(mixed, br.astype(np.float64), weight))
                alone_name = name + (
                    ", enrolled only" if name.startswith("curve") else ", enrolled only, share 0"
                )
                rows.setdefault((n, alone_name), []).append(
                    ece(alone, br[known].astype(np.float64), np.ones(known.sum()))
                )
    print("| gallery | confidence | ECE, mean (range) over halvings |\n|---|---|---|")
    for (n, name), values in rows.items():
        print(f"| {n} images | {name} | {np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
