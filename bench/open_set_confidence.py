"""Which confidence is calibrated on galleries of animals the model never saw, by gallery size.

The confidence that the best candidate is right splits by Bayes' rule (`training/open_set.py`,
`ConfidenceModel`): the chance that the query is of an enrolled animal, and the chance that the
best candidate is right if it is. This benchmark refits both from the artifact's *validation*
individuals, as `animalid calibrate` does, with the second part fitted two ways:

* **drawn**: one logistic regression per gallery size of the table, on the galleries drawn from
  the validation scores (their highest distractors from the pooled tail beyond the validation data);
  the cards before 2026-12-05;
* **validation galleries**: one regression for every size, on the enrolled queries of the
  validation galleries themselves (now).

and measures both on the galleries of `bench/open_set_identify.py` (same seeds, same draw of
strangers and enrolment, the validation animals as padding toward the larger sizes), built here
from the embeddings without a server: the expected calibration error (ECE) of enrolled queries
alone with the share of strangers set to 0 (a gallery asked only about its own animals), and of all
queries with the strangers weighted to the calibration's share. The thresholds play no part.

    python bench/open_set_confidence.py --artifact runs/study/dogs-lite2-frozen/artifacts/dog \\
        --data ../shared/data/dogfacenet/manifest.csv --embeddings runs/dogs-lite2-emb.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from training.artifact import load_artifact, read_card
from training.calibration import _embed
from training.data import Dataset, Sample, cached_shard
from training.open_set import (
    GALLERY_SIZES,
    MIN_CALIBRATION_INDIVIDUALS,
    ConfidenceModel,
    OpenSetCalibration,
    gallery_anchor,
    query_scores,
    right_regression,
    sampled_top2,
)
from training.pipeline import card_config, held_out, split_part

sys.path.insert(0, str(Path(__file__).resolve().parent))
from open_set_identify import Plan, card_strangers, ece, plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--artifact", type=Path, required=True, help="a study artifact (with test individuals)"
    )
    parser.add_argument("--data", type=Path, required=True, help="where the card's training data lives")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[30, 100, 300, 1000], help="gallery sizes (images)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument(
        "--stranger-fraction", type=float, default=0.25, help="share of test animals never enrolled"
    )
    parser.add_argument(
        "--card-strangers",
        action="store_true",
        help="the strangers are the animals the card's configuration keeps aside (cattle: openset-* cows)",
    )
    parser.add_argument(
        "--embeddings", type=Path, help="an .npz of the photos' embeddings: read when it exists, else written"
    )
    return parser.parse_args()


def embeddings(args: argparse.Namespace, samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Photo path -> embedding, of every sample (cached in ``--embeddings``)."""
    if args.embeddings is not None and args.embeddings.exists():
        saved = np.load(args.embeddings)
        return dict(zip(saved["paths"].tolist(), saved["emb"], strict=True))
    loaded = load_artifact(args.artifact, "cpu")
    shard = cached_shard(
        Dataset(tuple(samples), str(args.data)),
        loaded.card.preprocess,
        card_config(loaded.card).cache_dir or None,
    )
    emb = _embed(loaded, shard)
    paths = np.array([str(s.path) for s in samples])
    if args.embeddings is not None:
        np.savez(args.embeddings, emb=emb, paths=paths)
    return dict(zip(paths.tolist(), emb, strict=True))


def refitted(
    card_table: OpenSetCalibration, val: Sequence[Sample], vec: dict[str, np.ndarray]
) -> dict[str, OpenSetCalibration]:
    """The card's table with its confidence model refitted from the validation photos three ways."""
    emb = np.stack([vec[str(s.path)] for s in val])
    scores = query_scores(emb, [s.individual for s in val], [s.group for s in val], seed=0, repeats=5)
    rng = np.random.default_rng(0)
    draws = [sampled_top2(scores, size / scores.images_per_individual, rng) for size in GALLERY_SIZES]
    anchor = gallery_anchor(scores, rng)
    now = ConfidenceModel.fit(draws, anchor)
    alone = right_regression(*anchor.real, now.max_margin).tolist()
    table = replace(card_table, gallery_sizes=list(GALLERY_SIZES))
    return {
        f"drawn galleries (before; now with fewer than {MIN_CALIBRATION_INDIVIDUALS} animals)": replace(
            table, confidence_model=ConfidenceModel.fit(draws)
        ),
        "validation galleries alone": replace(
            table, confidence_model=replace(now, right_logit=[alone] * len(draws))
        ),
        "validation galleries + drawn change (now)": replace(table, confidence_model=now),
    }


@dataclass
class Answers:
    """The two best individuals' similarities of every query of one gallery, and its shape."""

    best: np.ndarray
    second: np.ndarray
    right: np.ndarray
    stranger: np.ndarray
    shape: Counter[int]  # images per individual -> individuals with that many


def galleries(chosen: Plan, sizes: Sequence[int], vec: dict[str, np.ndarray]) -> dict[int, Answers]:
    """The galleries of ``chosen`` grown to each size in turn as `bench/open_set_identify.py` enrols
    them, with every query of an enrolled animal and of a stranger."""
    out: dict[int, Answers] = {}
    enrolled: list[str] = []
    size = 0
    for target in sorted(sizes):
        for name, photos in chosen.enrol.items():
            if size >= target:
                break
            if name not in enrolled:
                enrolled.append(name)
                size += len(photos)
        gallery = np.stack([vec[str(p)] for n in enrolled for p in chosen.enrol[n]])
        owner = np.repeat(np.arange(len(enrolled)), [len(chosen.enrol[n]) for n in enrolled])
        asked = [(n, p) for n in enrolled for p in chosen.genuine.get(n, [])]
        truth = [enrolled.index(n) for n, _ in asked] + [-1] * len(chosen.strangers)
        queries = np.stack([vec[str(p)] for _, p in asked] + [vec[str(p)] for _, p in chosen.strangers])
        sim = queries @ gallery.T
        # one column more than animals: a gallery of one animal has a second of -inf (none)
        by_animal = np.full((len(queries), len(enrolled) + 1), -np.inf, dtype=np.float32)
        np.maximum.at(by_animal.T, owner, sim.T)
        order = np.argsort(-by_animal, axis=1)[:, :2]
        rows = np.arange(len(queries))
        out[target] = Answers(
            best=by_animal[rows, order[:, 0]].astype(np.float64),
            second=by_animal[rows, order[:, 1]].astype(np.float64),
            right=order[:, 0] == np.array(truth),
            stranger=np.array(truth) < 0,
            shape=Counter(len(chosen.enrol[n]) for n in enrolled),
        )
    return out


def confidences(table: OpenSetCalibration, answers: Answers, share: float) -> np.ndarray:
    size = table.equivalent_size(answers.shape)
    return np.array(
        [table.probability(b, size, s, share) for b, s in zip(answers.best, answers.second, strict=True)]
    )


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    card = read_card(args.artifact)
    if card.open_set is None:
        raise SystemExit(f"{args.artifact}: the model card has no open-set table (run `animalid calibrate`)")
    test = list(held_out(card, args.data).samples)
    val = list(split_part(card, "val", args.data).samples)
    outside = card_strangers(card, args.data) if args.card_strangers else None
    vec = embeddings(args, test + val + (outside or []))
    tables = refitted(card.open_set, val, vec)
    share = next(iter(tables.values())).stranger_share
    runs = [
        galleries(plan(test, val, args.stranger_fraction, seed, outside), args.sizes, vec)
        for seed in args.seeds
    ]
    print(f"{card.model_version}: seeds {args.seeds}, strangers weighted to a share of {share:.2f}\n")
    print(
        "| gallery (mean images) | enrolled queries | best right (enrolled) | confidence fitted on "
        "| mean confidence, share 0 | ECE, share 0, enrolled only | ECE at the share |"
    )
    print("|---|---|---|---|---|---|---|")
    for target in sorted(args.sizes):
        answers = [run[target] for run in runs]
        stranger = np.concatenate([a.stranger for a in answers])
        right = np.concatenate([a.right for a in answers]).astype(np.float64)
        known = ~stranger
        weight = np.where(stranger, share / (1 - share) * known.sum() / max(stranger.sum(), 1), 1.0)
        images = np.mean([sum(k * n for k, n in a.shape.items()) for a in answers])
        for i, (name, table) in enumerate(tables.items()):
            alone = np.concatenate([confidences(table, a, 0.0)[~a.stranger] for a in answers])
            mixed = np.concatenate([confidences(table, a, share) for a in answers])
            lead = (
                f"| {target} ({images:.0f}) | {known.sum()} | {right[known].mean():.3f} |"
                if i == 0
                else "| | | |"
            )
            print(
                f"{lead} {name} | {alone.mean():.3f} | {ece(alone, right[known], np.ones(known.sum())):.3f} "
                f"| {ece(mixed, right, weight):.3f} |"
            )
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
