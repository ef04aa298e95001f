"""How an enrolled animal's score is taken from its photos: its best photo (what the service does),
the mean of its best k, or its centroid. Offline, on the herd of ``bench/finetune_gallery.py``.

Cattle: every cow of the model's data, half of its clips enrolled and its other clips queried (the
plan of ``finetune_gallery.py`` with the same seed, so the first row reproduces that benchmark's
top-1 through the service); the configured strangers' photos are never enrolled. For each rule:
top-1, and at the thresholds that let 1% and 5% of the strangers' photos through (read from those
photos, so an oracle threshold, not the card's): the share of queries answered with the right cow
and with a wrong one.

    python bench/individual_scoring.py --model runs/study/cattle-from-dogs-128x64-e10-val20/artifacts/cattle
"""

from __future__ import annotations

import argparse
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from finetune_gallery import DEFAULT_DATA, enrolment_data, split_units, stranger_photos, units_of

from training.artifact import LoadedModel, load_artifact
from training.evaluate import embed_pixels
from training.preprocess import open_image, to_uint8_tensor

RULES = ("best photo", "mean of best 3", "mean of best 5", "centroid")


def embed(loaded: LoadedModel, paths: list[Path]) -> np.ndarray:
    spec = loaded.card.preprocess
    pixels = torch.stack([to_uint8_tensor(open_image(p, size=spec.input_size), spec) for p in paths])
    return embed_pixels(loaded.model, pixels, spec, "cpu")


def individual_scores(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, rule: str) -> np.ndarray:
    """(queries, individuals in sorted order): each individual's score by ``rule``."""
    sim = queries @ gallery.T
    columns = []
    for name in np.unique(labels):
        mine = labels == name
        if rule == "centroid":
            centre = gallery[mine].mean(axis=0)
            columns.append(queries @ (centre / np.linalg.norm(centre)))
            continue
        k = 1 if rule == "best photo" else int(rule.rsplit(" ", 1)[1])
        columns.append(np.sort(sim[:, mine], axis=1)[:, -k:].mean(axis=1))
    return np.column_stack(columns)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a cattle artifact folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA["cattle"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_artifact(args.model)
    dataset, _ = enrolment_data("cattle", loaded.card, args.data)
    plan = split_units(units_of(dataset), 0, args.seed)
    enrolled = [(name, path) for name, (batches, _) in plan.items() for batch in batches for path in batch]
    queried = [(name, path) for name, (_, queries) in plan.items() for path in queries]
    gallery = embed(loaded, [path for _, path in enrolled])
    queries = embed(loaded, [path for _, path in queried])
    strangers = embed(loaded, stranger_photos(loaded.card, args.data))
    labels = np.array([name for name, _ in enrolled])
    truth = np.array([name for name, _ in queried])
    names = np.unique(labels)
    print(
        f"{loaded.card.model_version}: {len(names)} cows, {len(gallery)} enrolled photos, {len(queries)} "
        f"queries, {len(strangers)} stranger photos; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, CPU\n"
    )
    print("| score of an individual | top-1 | threshold, right, wrong at 1% of strangers | at 5% |")
    print("|---|---|---|---|")
    for rule in RULES:
        scores = individual_scores(queries, gallery, labels, rule)
        best, answer = scores.max(axis=1), names[scores.argmax(axis=1)]
        stranger_best = individual_scores(strangers, gallery, labels, rule).max(axis=1)
        cells = [rule, f"{np.mean(answer == truth):.4f}"]
        for fpir in (0.01, 0.05):
            cut = float(np.quantile(stranger_best, 1 - fpir))
            passed = best >= cut
            right, wrong = np.mean(passed & (answer == truth)), np.mean(passed & (answer != truth))
            cells.append(f"{cut:.3f}, {right:.3f}, {wrong:.3f}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
