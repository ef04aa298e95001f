"""How strict is a card's open-set threshold for a herd's own animals as strangers? Every photo of
the card's test and validation individuals is the gallery; each animal in turn is left out and its
photos asked against the rest, as a never-enrolled herd-mate would be. Printed: the share of those
photos whose best similarity reaches the card's threshold for this gallery at each target FPIR
(with a 95% interval over the animals drawn again with replacement), and the threshold that would
hold each target on this gallery.

    python configs/study/gallery_loo.py ARTIFACT

The estimate needs no stranger photos, only the enrolled ones: it is what a deployment could compute
from its own gallery. It differs from a stranger's view in two ways: the left-out animal's photos are
gallery photos (enrolment photos, not queries), and the gallery lacks that animal's photos (a few
of its images fewer).
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np

from training.artifact import load_artifact
from training.data import cached_shard
from training.evaluate import embed_pixels
from training.open_set import bootstrap_weights
from training.pipeline import card_config, split_part

TARGETS = (0.01, 0.05)


def main(artifact: str) -> None:
    loaded = load_artifact(artifact, "cpu")
    card, config = loaded.card, card_config(loaded.card)
    if card.open_set is None:
        sys.exit("the card has no open-set table")
    shards = [
        cached_shard(split_part(card, part), card.preprocess, config.cache_dir or None)
        for part in ("test", "val")
    ]
    emb = np.concatenate([embed_pixels(loaded.model, s.pixels, card.preprocess, "cpu") for s in shards])
    who = np.array([name for s in shards for name in s.individuals], dtype=object)
    similarity = emb @ emb.T
    best = np.array([similarity[i, who != who[i]].max() for i in range(len(who))])
    shape = Counter(Counter(who.tolist()).values())  # images per animal -> animals
    size = card.open_set.equivalent_size(shape)
    draws = bootstrap_weights(who, 2000, np.random.default_rng(0))
    print(f"gallery: {len(who)} images of {len(set(who))} animals, read by the card as {size} images")
    for target in TARGETS:
        threshold = card.open_set.threshold(size, target)
        passed = best >= threshold
        rates = (draws @ passed) / draws.sum(axis=1)
        lo, hi = np.quantile(rates, [0.025, 0.975])
        holds = float(np.quantile(best, 1 - target))
        print(
            f"target {target:.0%}: card threshold {threshold:.3f}, herd-mates past it {passed.mean():.2%} "
            f"(95% interval {lo:.2%}-{hi:.2%}); {target:.0%} of them past {holds:.3f}"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
