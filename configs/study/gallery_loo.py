"""How strict is a card's open-set threshold for a herd's own animals as strangers? Every photo of
the card's test and validation individuals is the gallery; each animal in turn is left out and its
photos asked against the rest, as a never-enrolled herd-mate would be. Printed: the share of those
photos whose best similarity reaches the card's threshold for this gallery at each target FPIR
(with a 95% interval over the animals drawn again with replacement), and the threshold that would
hold each target on this gallery.

    python configs/study/gallery_loo.py ARTIFACT

The estimate needs no stranger photos, only the enrolled ones: a deployment computes the same on its
own gallery with `animalid gallery check` (`training.open_set.herd_check`, the same check read in
blocks). It differs from a
stranger's view in two ways: the left-out animal's photos are gallery photos (enrolment photos, not
queries), and the gallery lacks that animal's photos (a few of its images fewer).
"""

from __future__ import annotations

import sys

import numpy as np

from training.artifact import load_artifact
from training.data import cached_shard
from training.evaluate import embed_pixels
from training.open_set import herd_mates
from training.pipeline import card_config, split_part


def main(artifact: str) -> None:
    loaded = load_artifact(artifact, "cpu")
    card, config = loaded.card, card_config(loaded.card)
    if card.open_set is None:
        sys.exit("the card has no open-set table")
    cache = config.cache_dir or None
    shards = [cached_shard(split_part(card, part), card.preprocess, cache) for part in ("test", "val")]
    emb = np.concatenate([embed_pixels(loaded.model, s.pixels, card.preprocess, "cpu") for s in shards])
    who = [name for s in shards for name in s.individuals]
    size, rows = herd_mates(emb, who, card.open_set, max_queries=len(who))
    print(f"gallery: {len(who)} images of {len(set(who))} animals, read by the card as {size} images")
    for row in rows:
        low, high = row.interval
        print(
            f"target {row.target:.0%}: card threshold {row.threshold:.3f}, herd-mates past it {row.past:.2%} "
            f"(95% interval {low:.2%}-{high:.2%}); {row.target:.0%} of them past {row.holding:.3f}"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
