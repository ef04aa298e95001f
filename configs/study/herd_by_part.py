"""The herd check of a deployment's gallery, split by what the served model's networks saw of each
animal: its training animals, its validation animals and its test animals (the card's split).

`animalid gallery check` leaves each enrolled animal out in turn and asks its photos against the
rest. This asks the same of each part's animals apart, at the card's threshold for the gallery's
size and target FPIR, with and without the service's minimum match confidence, to tell which
animals a high share comes from (docs/results.md, "The fused model's herd check, by part").

    PYTHONPATH=. python configs/study/herd_by_part.py runs/finetune-cattle-fused2 --species cattle \
        --data ../shared/data/holstein_cowface/manifest.csv
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from service.db.models import Individual
from service.db.repository import Repository, vector_from_bytes
from service.db.session import make_engine, make_sessionmaker
from training.artifact import read_card
from training.closed_set import ConfidenceFloor, herd_mates_matched
from training.pipeline import trained_on


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("deployment", type=Path, help="folder with animalid.db and models/ (a kept run)")
    parser.add_argument("--species", default="cattle")
    parser.add_argument("--data", required=True, help="the manifest the card's split is recomputed from")
    parser.add_argument("--target-fpir", type=float, default=0.01)
    parser.add_argument("--min-confidence", type=float, default=0.5)
    parser.add_argument(
        "--listed", nargs="+", default=[], metavar="ID",
        help="also these animals (external ids) as a row of their own: a fine-tune job's kept-out list",
    )  # fmt: skip
    args = parser.parse_args()
    card = read_card(args.deployment / "models" / args.species)
    table = card.open_set
    assert table is not None, "the card has no open-set table"
    _, split = trained_on(card, args.data)
    engine = make_engine(f"sqlite:///{(args.deployment / 'animalid.db').resolve()}")
    with make_sessionmaker(engine)() as session:
        repo = Repository(session)
        species = repo.species_by_name(args.species)
        assert species is not None
        active = repo.active_version(species.id)
        assert active is not None and active.version == card.model_version, "vectors of another model"
        animals = session.query(Individual).filter_by(species_id=species.id)
        names = {row.id: row.external_id for row in animals}
        rows = [row for chunk in repo.iter_gallery(active.id) for row in chunk]
    emb = np.stack([vector_from_bytes(row.vector) for row in rows])
    labels = np.array([names[row.individual_id] for row in rows])
    size = table.equivalent_size(Counter(Counter(labels.tolist()).values()))
    plain = table.threshold(size, args.target_fpir)
    with_floor = table.threshold(size, args.target_fpir, args.min_confidence)
    floor = ConfidenceFloor(table, size, args.min_confidence)
    print(
        f"{card.model_version}: {len(labels)} photos of {len(set(labels))} animals, read as {size} images; "
        f"threshold at FPIR {args.target_fpir}: {plain:.4f}, with the minimum confidence "
        f"{args.min_confidence}: {with_floor:.4f}"
    )
    print("\n| animals | count | photos | answered `match`, threshold only | with the minimum confidence |")
    print("|---|---|---|---|---|")
    enrolled = set(labels.tolist())
    groups = {part: enrolled & set(getattr(split, part)) for part in ("train", "val", "test")}
    groups |= {"all": enrolled, "listed": enrolled & set(args.listed)}
    for part, members in groups.items():
        asked = sorted(members)
        if not asked:
            continue
        photos = int(np.isin(labels, asked).sum())
        alone = herd_mates_matched(emb, labels, asked, plain)
        floored = herd_mates_matched(emb, labels, asked, with_floor, floor)
        print(f"| {part} | {len(asked)} | {photos} | {alone:.2%} | {floored:.2%} |")


if __name__ == "__main__":
    main()
