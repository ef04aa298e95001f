"""Does flip test-time augmentation help a model? The study protocol with and without it.

    python configs/study/flip_tta.py ARTIFACT

With flipping, an image's embedding is the normalised sum of the embeddings of the image and of
its mirror image, for validation, test and stranger photos alike; everything else (split,
threshold calibration, protocol, seeds) is the package's evaluation of the artifact. Only
meaningful for models trained with random flips (not the cattle ones, whose coat patterns are not
symmetric). Prints one Markdown row per variant.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial

import numpy as np

from training.artifact import load_artifact
from training.data import Shard
from training.evaluate import embed_pixels
from training.model import EmbeddingNet
from training.pipeline import card_config, load_strangers, run_protocols, strangers_of
from training.preprocess import PreprocessSpec
from training.train import prepare_data


def embed(model: EmbeddingNet, shard: Shard, spec: PreprocessSpec, flip: bool) -> np.ndarray:
    emb = embed_pixels(model, shard.pixels, spec, "cpu")
    if flip:
        emb = emb + embed_pixels(model, shard.pixels.flip(-1), spec, "cpu")
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


def main(artifact: str) -> None:
    loaded = load_artifact(artifact, "cpu")
    card, spec = loaded.card, loaded.card.preprocess
    config = card_config(card)
    config = replace(config, datasets=tuple(d for d in config.datasets if d.species in (None, card.species)))
    (data,) = [d for d in prepare_data(config, spec) if d.species == card.species]
    strangers = strangers_of(load_strangers(config, spec), card.species)
    header = ["variant", "top-1", "top-5", "mAP", "TAR@FAR1e-3", "EER", "unknown AUROC", "pair verification"]
    print(
        "| " + " | ".join([*header, "one-shot rank-1 / rank-5"]) + " |\n" + "|---" * (len(header) + 1) + "|"
    )
    for flip in (False, True):
        evaluation, paper = run_protocols(
            partial(embed, loaded.model, spec=spec, flip=flip), config, data.val, data.test, strangers
        )
        result = evaluation.summary()
        cells = [
            "image + mirror image" if flip else "image",
            f"{result['top1']:.3f} ± {result['top1_std']:.3f}",
            *(f"{result[key]:.3f}" for key in ("top5", "map", "tar_at_far_0.001", "eer", "open_set_auroc")),
            f"{paper['pair_verification_accuracy']:.3f}",
            f"{paper['one_shot_rank1']:.3f} / {paper['one_shot_rank5']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
