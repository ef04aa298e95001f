"""Calibrating and evaluating an exported artifact on data it was not trained with.

``calibrate_artifact`` writes a copy of an artifact whose card holds the open-set table
(:mod:`training.open_set`), computed on the artifact's own validation individuals or on every
individual of given data, optionally for another species (``as_species``: the card is relabelled
and says so). ``evaluate_all_individuals`` evaluates every individual of given data as test
individuals with the card's own calibration: nothing of that data is used to tune anything.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from training.artifact import LoadedModel, ModelCard, load_artifact, write_card
from training.config import DatasetConfig, TrainConfig
from training.data import Shard, cached_shard, load_dataset
from training.evaluate import calibrate_threshold, embed_pixels, evaluate_embeddings
from training.open_set import MIN_INDIVIDUALS, OpenSetCalibration
from training.pipeline import (
    SpeciesEvaluation,
    calibration_warnings,
    card_config,
    load_strangers,
    open_set_table,
    split_part,
    strangers_of,
)
from training.report import write_report
from training.train import resolve_device

log = logging.getLogger(__name__)


def relabelled(card: ModelCard, species: str | None) -> ModelCard:
    """The card as a model for ``species`` (a model of one species used for another), recording the
    species it was trained for; unchanged when ``species`` is None or already the card's."""
    if species is None or species == card.species:
        return card
    return replace(card, species=species, relabelled_from=card.relabelled_from or card.species)


def check_species(card: ModelCard, shard: Shard) -> None:
    if shard.species != card.species:
        raise ValueError(
            f"the data is of species {shard.species!r} but the model is for {card.species!r}; to use "
            f"this model for {shard.species!r}, say so explicitly with --as-species {shard.species}"
        )


def data_shard(config: TrainConfig, datasets: list[DatasetConfig], card: ModelCard) -> Shard:
    """Every image of the given data (one species) as one shard, checked against the card's species."""
    if len(datasets) != 1:
        raise ValueError(f"give exactly one dataset, got {len(datasets)}")
    d = datasets[0]
    dataset = load_dataset(
        d.source,
        species=d.species,
        group_pattern=d.group_pattern,
        exclude_individuals=d.exclude_individuals,
        skip_bad=config.skip_bad,
    )
    shard = cached_shard(dataset, card.preprocess, config.cache_dir or None)
    check_species(card, shard)
    return shard


def _embed(loaded: LoadedModel, shard: Shard) -> np.ndarray:
    device = next(loaded.model.parameters()).device
    return embed_pixels(loaded.model, shard.pixels, loaded.card.preprocess, device)


def recalibrated(
    card: ModelCard, emb: np.ndarray, shard: Shard, far: float, config: TrainConfig, source: str
) -> ModelCard:
    """The card with its pair threshold (at ``far``) and open-set table computed on ``shard``, whose
    individuals the model never trained on (``emb`` their embeddings); ``source`` names them in the
    card's warning when they are few."""
    individuals = len(set(shard.individuals))
    # The card's count and warning describe this calibration, not the one it was copied from
    # (a dog card calibrated on 100 dogs, recalibrated on 8 lions, rests on 8 individuals).
    return replace(
        card,
        threshold=calibrate_threshold(emb, np.array(shard.individuals), far),
        threshold_far=far,
        open_set=open_set_table(emb, shard, config),
        metrics=card.metrics | {"calibration_individuals": individuals},
        warnings=calibration_warnings(individuals, source, "more data"),
    )


def calibrate_artifact(
    artifact: str | Path,
    out_dir: str | Path,
    datasets: list[DatasetConfig] | None = None,
    source: str | Path | None = None,
    as_species: str | None = None,
    device: str = "auto",
) -> tuple[Path, OpenSetCalibration]:
    """Write ``out_dir`` (weights copied, or the card replaced in place when it is ``artifact``)
    with the open-set table computed on validation individuals.

    Without ``datasets``, the artifact's own validation individuals (its split recomputed from the
    card; ``source`` relocates the data). With ``datasets``, every individual of that data, and the
    pair threshold is recalibrated on it too (at the card's FAR).
    """
    loaded = load_artifact(artifact, resolve_device(device))
    card = relabelled(loaded.card, as_species)
    config = card_config(card)
    if datasets:
        shard = data_shard(config, datasets, card)
    else:
        val = split_part(card, "val", source)
        shard = cached_shard(val, card.preprocess, config.cache_dir or None)
    emb = _embed(loaded, shard)
    if datasets:
        far = card.threshold_far or config.target_far
        card = recalibrated(card, emb, shard, far, config, f"individuals of {datasets[0].source}")
    else:
        card = replace(card, open_set=open_set_table(emb, shard, config))
    # A herd check measured the old table's thresholds: the new table needs its own.
    card = replace(card, herd=None)
    table = card.open_set
    if table is None:
        raise ValueError(
            f"{len(set(shard.individuals))} individuals are too few for an open-set table "
            f"(at least {MIN_INDIVIDUALS})"
        )
    log.info(
        "open-set table on %d images of %d individuals: threshold at FPIR 1%% and 1,000 images %.3f",
        len(shard.individuals),
        len(set(shard.individuals)),
        table.threshold(1000, 0.01),
    )
    return write_card(card, out_dir, weights_from=artifact), table


def evaluate_all_individuals(
    artifact: str | Path,
    out_dir: str | Path,
    datasets: list[DatasetConfig],
    strangers: DatasetConfig | None = None,
    as_species: str | None = None,
    device: str = "auto",
) -> SpeciesEvaluation:
    """Every individual of ``datasets`` as a test individual, decided with the card's own threshold
    (no split, no recalibration: the data is only tested on)."""
    loaded = load_artifact(artifact, resolve_device(device))
    card = relabelled(loaded.card, as_species)
    if card.threshold is None:
        raise ValueError("the model card has no calibrated threshold to evaluate with")
    config = card_config(card)
    if strangers is not None:
        config = replace(config, strangers=strangers)
    test = data_shard(config, datasets, card)
    stranger_shard = strangers_of(load_strangers(config, card.preprocess), card.species)
    kwargs = {}
    if stranger_shard is not None:
        kwargs = {
            "strangers_emb": _embed(loaded, stranger_shard),
            "strangers_individuals": np.array(stranger_shard.individuals),
        }
    result = evaluate_embeddings(
        _embed(loaded, test),
        np.array(test.individuals),
        np.array(test.groups),
        threshold=card.threshold,
        n_repeats=config.eval_repeats,
        unknown_fraction=config.unknown_fraction,
        seed=config.seed,
        **kwargs,
    )
    report = write_report(
        result,
        Path(out_dir),
        title=f"{card.model_version}: every individual of {datasets[0].source}",
        card_info=card.to_dict() | {"open_set": "(see card)"},
        open_set=card.open_set,
        warnings=card.warnings,
    )
    calibrated_on = int(card.metrics.get("calibration_individuals", 0))
    return SpeciesEvaluation(
        card.species, card.threshold, result, report, {}, calibrated_on, list(card.warnings)
    )
