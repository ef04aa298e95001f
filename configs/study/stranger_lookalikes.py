"""Which never-enrolled animals look like which test animals: for every photo of the card's strangers
(cattle: the openset-* cows), the best similarity to each test individual over all its photos, and
the (stranger, test individual) pairs reaching each threshold, most photos first.

    python configs/study/stranger_lookalikes.py ARTIFACT THRESHOLD [THRESHOLD ...]

The artifact's split is recomputed from its card, as `bench/open_set_identify.py --card-strangers`
does; its test individuals are the gallery here with every photo (the benchmark enrols about half).
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np

from training.artifact import load_artifact
from training.data import Shard, cached_shard
from training.evaluate import embed_pixels
from training.pipeline import card_config, load_strangers, split_part


def main(artifact: str, thresholds: list[float]) -> None:
    loaded = load_artifact(artifact, "cpu")
    card, config = loaded.card, card_config(loaded.card)
    strangers = load_strangers(config, card.preprocess)
    if strangers is None:
        sys.exit("the card's training configuration names no strangers")
    test = cached_shard(split_part(card, "test"), card.preprocess, config.cache_dir or None)

    def embed(shard: Shard) -> np.ndarray:
        return embed_pixels(loaded.model, shard.pixels, card.preprocess, "cpu")

    similarity = embed(strangers) @ embed(test).T
    test_ids = np.array(test.individuals)
    cows = sorted(set(test.individuals))
    best = np.stack([similarity[:, test_ids == c].max(axis=1) for c in cows], axis=1)
    for threshold in thresholds:
        pairs: Counter[tuple[str, str]] = Counter()
        for row, name in enumerate(strangers.individuals):
            for j in np.flatnonzero(best[row] >= threshold):
                pairs[(name, cows[j])] += 1
        over = int((best.max(axis=1) >= threshold).sum())
        print(f"threshold {threshold}: {over} of {len(strangers.individuals)} stranger photos reach it")
        for (name, cow), n in pairs.most_common():
            print(f"  {name} ~ {cow}: {n} photos")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], [float(t) for t in sys.argv[2:]])
