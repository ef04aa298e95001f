"""Does the open-set table hold its target FPIR when animals are enrolled with fewer or more photos
than its calibration had? A check on an artifact's *test* individuals (never in training, never in
its calibration), without a server.

The table (`training/open_set.py`) is calibrated on galleries whose animals have the validation
data's enrolled photos each (about 2.9 for the dog model). A farm may enroll one photo per animal,
or ten. This script draws galleries of the test individuals with 1 photo each, half their photos, or
all of them, keeps the other test individuals as strangers (every photo a query), and measures the
share of stranger photos whose best score reaches the threshold the table gives (FPIR) when the
gallery is read

* by its images (cards from before the image exponent; an exponent of 1),
* by its individuals (each counted with the calibration's photos; an exponent of 0),
* with the card's image exponent (`OpenSetCalibration.equivalent_size`: an animal of ``n`` photos
  counts as ``(n / m) ** a`` animals of the calibration's ``m``), as the service reads it now,

beside the threshold that would have given exactly the target on these draws. With ``--one-group``,
also galleries whose animals are enrolled with every photo of one of their groups (cattle: one video
clip), photos more alike than as many drawn at random, which the exponent (measured on random
photos) may overstate.

    python bench/open_set_photos_per_animal.py --artifact runs/fused-dog-study \\
        --data ../shared/data/dogfacenet/manifest.csv
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from training.artifact import load_artifact
from training.calibration import _embed
from training.data import cached_shard
from training.open_set import OpenSetCalibration
from training.pipeline import card_config, held_out

THRESHOLDS = np.round(np.arange(0.0, 1.0005, 0.001), 3)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--artifact", type=Path, required=True, help="a model trained without its test individuals"
    )
    parser.add_argument("--data", type=Path, required=True, help="where the card's training data lives")
    parser.add_argument(
        "--enrolled", type=int, nargs="+", default=[35, 150], help="test individuals enrolled per gallery"
    )
    parser.add_argument("--fpirs", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--draws", type=int, default=40, help="random galleries per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--embeddings", type=Path, help="an .npz of the test embeddings: read when it exists, else written"
    )
    parser.add_argument(
        "--one-group",
        action="store_true",
        help="also enrol each animal with every photo of one of its groups (a clip, a session)",
    )
    return parser.parse_args()


def test_embeddings(
    args: argparse.Namespace, card_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The test photos' embeddings, individuals and groups (None from a file saved without them)."""
    if args.embeddings is not None and args.embeddings.exists():
        saved = np.load(args.embeddings)
        return saved["emb"], saved["ind"], saved.get("grp")
    loaded = load_artifact(card_path, "cpu")
    test = held_out(loaded.card, args.data)
    shard = cached_shard(test, loaded.card.preprocess, card_config(loaded.card).cache_dir or None)
    emb, ind, grp = _embed(loaded, shard), np.array(shard.individuals), np.array(shard.groups)
    if args.embeddings is not None:
        np.savez(args.embeddings, emb=emb, ind=ind, grp=grp)
    return emb, ind, grp


def photos_to_enrol(
    own: np.ndarray, photos: str, groups: np.ndarray | None, rng: np.random.Generator
) -> list[int]:
    """The photos (indices into the test photos) enrolled for one animal whose photos are ``own``:
    one, half or all of them at random, or every photo of one of its groups at random."""
    if photos == "one group":
        assert groups is not None
        chosen = rng.choice(np.unique(groups[own]))
        return own[groups[own] == chosen].tolist()
    take = 1 if photos == "1" else len(own) if photos == "all" else max(1, len(own) // 2)
    return rng.choice(own, take, replace=False).tolist()


def scenario(
    sim: np.ndarray,
    index: np.ndarray,
    groups: np.ndarray | None,
    enrolled: int,
    photos: str,
    draws: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[Counter[int]]]:
    """FPIR at every threshold of :data:`THRESHOLDS` over ``draws`` galleries, and each gallery's
    shape (images per individual -> individuals)."""
    individuals = int(index.max()) + 1
    reached = np.zeros(THRESHOLDS.size)
    queries = 0
    shapes = []
    for _ in range(draws):
        order = rng.permutation(individuals)
        columns: list[int] = []
        shape: Counter[int] = Counter()
        for j in order[:enrolled]:
            taken = photos_to_enrol(np.flatnonzero(index == j), photos, groups, rng)
            columns.extend(taken)
            shape[len(taken)] += 1
        strangers = np.flatnonzero(np.isin(index, order[enrolled:]))
        best = sim[np.ix_(strangers, columns)].max(axis=1)
        reached += (best[:, None] >= THRESHOLDS[None, :]).sum(axis=0)
        queries += len(strangers)
        shapes.append(shape)
    return reached / queries, shapes


def main() -> int:
    args = parse_args()
    loaded = load_artifact(args.artifact, "cpu")
    table = loaded.card.open_set
    if table is None:
        raise SystemExit(f"{args.artifact}: the model card has no open-set table (run `animalid calibrate`)")
    emb, ind, groups = test_embeddings(args, args.artifact)
    if args.one_group and groups is None:
        raise SystemExit(f"{args.embeddings}: saved without the photos' groups; remove it to embed again")
    _, index = np.unique(ind, return_inverse=True)
    emb = np.asarray(emb, dtype=np.float32)
    sim = emb @ emb.T
    readings: dict[str, OpenSetCalibration] = {
        "images": replace(table, image_exponent=1.0),
        "individuals": replace(table, image_exponent=0.0),
        f"exponent {table.image_exponent:.2f}": table,
    }
    print(
        f"{loaded.card.model_version}: {len(set(ind))} test individuals, {len(ind)} photos; "
        f"calibration {table.images_per_individual:.2f} photos per individual, image exponent "
        f"{table.image_exponent:.3f}; {args.draws} galleries per row"
    )
    print(
        "| photos per animal | animals | images | read by | size read | "
        + " | ".join(f"threshold at {f:g} | FPIR" for f in args.fpirs)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|---|" * len(args.fpirs))
    rng = np.random.default_rng(args.seed)
    for enrolled in args.enrolled:
        for photos in ("1", "half", "all", *(["one group"] if args.one_group else [])):
            fpir, shapes = scenario(sim, index, groups, enrolled, photos, args.draws, rng)
            images = round(float(np.mean([sum(n * k for n, k in s.items()) for s in shapes])))
            for name, reading in readings.items():
                size = round(float(np.mean([reading.equivalent_size(s) for s in shapes])))
                cells = []
                for target in args.fpirs:
                    cut = reading.threshold(size, target)
                    measured = fpir[np.searchsorted(THRESHOLDS, round(cut, 3))]
                    cells.append(f"{cut:.3f} | {measured:.2%}")
                print(f"| {photos} | {enrolled} | {images} | {name} | {size} | " + " | ".join(cells) + " |")
            exact = [THRESHOLDS[int(np.argmax(fpir <= target))] for target in args.fpirs]
            print(
                f"| {photos} | {enrolled} | {images} | threshold giving the target on these draws | | "
                + " | ".join(f"{t:.3f} | {target:.2%}" for t, target in zip(exact, args.fpirs, strict=True))
                + " |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
