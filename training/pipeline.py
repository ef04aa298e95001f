"""From a training run to served artifacts: calibrate, evaluate on test individuals, export, report.

``export_run`` turns a run's checkpoint into one artifact per species (a joint run gives several);
``evaluate_artifact`` re-evaluates an exported artifact on the test individuals of the split it
was trained with (or on another dataset) and writes a report.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from training.artifact import ArtifactError, ModelCard, export_artifact, load_artifact
from training.closed_set import evaluate_held_back, side_by_side
from training.config import DatasetConfig, TrainConfig, build_config
from training.data import Dataset, IndividualSplit, Shard, cached_shard, enrol_query_split, load_dataset
from training.evaluate import (
    EvaluationResult,
    accuracy_threshold,
    calibrate_threshold,
    embed_pixels,
    evaluate_embeddings,
    one_shot_identification,
    pair_verification_accuracy,
)
from training.fusion import Branch, fused_from, fusion_record, normalised_weights
from training.gradcam import explanation_panel, gradcam_grid, input_attribution_map
from training.model import FUSION_ARCHITECTURE, EmbeddingModel, EmbeddingNet
from training.open_set import (
    MIN_CALIBRATION_INDIVIDUALS,
    MIN_INDIVIDUALS,
    OpenSetCalibration,
    calibrate_open_set,
)
from training.preprocess import PreprocessSpec, normalize
from training.report import write_report
from training.train import (
    CHECKPOINT_FILE,
    SpeciesData,
    bare_model,
    load_checkpoint,
    prepare_data,
    preprocess_spec,
    pretrained_source,
    resolve_device,
    split_dataset,
)

log = logging.getLogger(__name__)

# The DogFaceNet paper's protocols are reported under its name for its species only.
PAPER_SPECIES = "dog"


@dataclass
class SpeciesEvaluation:
    species: str
    threshold: float
    result: EvaluationResult
    report: Path
    paper: dict[str, float]  # the DogFaceNet paper's protocols
    calibration_individuals: int
    warnings: list[str]
    open_set: OpenSetCalibration | None = None  # the 1:N table from validation individuals

    def metrics(self) -> dict[str, Any]:
        """What the model card records."""
        return self.result.summary() | self.paper | {"calibration_individuals": self.calibration_individuals}


def calibration_warnings(
    calibration_individuals: int,
    individuals: str = "validation individuals",
    remedy: str = "more data, or a larger --val-fraction",
) -> list[str]:
    """The card's and the report's warning when the threshold rests on too few individuals."""
    if calibration_individuals >= MIN_CALIBRATION_INDIVIDUALS:
        return []
    return [
        f"the decision threshold was calibrated on {calibration_individuals} {individuals}, "
        f"fewer than {MIN_CALIBRATION_INDIVIDUALS}: its false-accept rate on new animals is uncertain. "
        f"Calibrate on more individuals ({remedy}) before relying on match/unknown decisions."
    ]


def open_set_table(emb: np.ndarray, shard: Shard, config: TrainConfig) -> OpenSetCalibration | None:
    """The open-set table of ``shard``'s embeddings; None when its individuals are too few for one."""
    if len(set(shard.individuals)) < MIN_INDIVIDUALS:
        return None
    return calibrate_open_set(
        emb, shard.individuals, shard.groups, seed=config.seed, repeats=config.eval_repeats
    )


def load_strangers(config: TrainConfig, spec: PreprocessSpec) -> Shard | None:
    dataset = stranger_dataset(config)
    return None if dataset is None else cached_shard(dataset, spec, config.cache_dir or None)


def strangers_of(strangers: Shard | None, species: str) -> Shard | None:
    """The strangers to evaluate a species with: none when they are animals of another species."""
    return strangers if strangers is not None and strangers.species == species else None


def gradcam_examples(model: EmbeddingModel, shard: Shard, spec: PreprocessSpec, seed: int, count: int = 4):
    """(title, [panel]) rows for a few test individuals: a query and an enrolled reference side by
    side, each with its LayerCAM map of the similarity to the other."""
    rng = random.Random(seed)
    enrol, query = enrol_query_split(shard.individuals, shard.groups, rng)
    device = next(model.parameters()).device
    rows = []
    chosen = sorted(set(shard.individuals))[:count]
    for individual in chosen:
        q = next(i for i in query if shard.individuals[i] == individual)
        e = next(i for i in enrol if shard.individuals[i] == individual)
        images = [normalize(shard.pixels[i], spec).to(device) for i in (q, e)]
        emb = model.embed(torch.stack(images))
        cams = [
            input_attribution_map(model, images[0], emb[1]),
            input_attribution_map(model, images[1], emb[0]),
        ]
        pictures = [Image.fromarray(shard.pixels[i].permute(1, 2, 0).numpy()) for i in (q, e)]
        panel = explanation_panel(
            (pictures[0], cams[0]), (pictures[1], cams[1]), float(emb[0] @ emb[1]), "enrolled photo", tile=160
        )
        rows.append((f"{shard.species} {individual}", [panel]))
    return rows


def evaluate_species(
    model: EmbeddingModel,
    spec: PreprocessSpec,
    config: TrainConfig,
    val: Shard,
    test: Shard,
    strangers: Shard | None,
    out_dir: Path,
    title: str,
    card_info: dict[str, Any],
) -> SpeciesEvaluation:
    """Calibrate the threshold on validation individuals, evaluate on test ones, write the report."""
    device = next(model.parameters()).device
    embedded: dict[int, np.ndarray] = {}

    def embed(shard: Shard) -> np.ndarray:
        if id(shard) not in embedded:
            embedded[id(shard)] = embed_pixels(model, shard.pixels, spec, device)
        return embedded[id(shard)]

    result, extra = run_protocols(embed, config, val, test, strangers)
    open_set = open_set_table(embed(val), val, config)
    if open_set is None:
        log.warning("%d validation individuals: too few for the open-set table", len(set(val.individuals)))
    grid = gradcam_grid(gradcam_examples(model, test, spec, config.seed), ["query and enrolled reference"])
    calibration_individuals = len(set(val.individuals))
    warnings = calibration_warnings(calibration_individuals)
    report = write_report(
        result,
        out_dir,
        title=title,
        card_info=card_info,
        gradcam_grid=grid,
        warnings=warnings,
        open_set=open_set,
    )
    if test.species == PAPER_SPECIES:
        with report.open("a") as fh:
            fh.write(
                "\n## DogFaceNet paper protocols (Mougeot et al. 2019)\n\n"
                "| protocol | value |\n|---|---|\n"
                f"| verification accuracy, balanced test pairs, threshold {extra['pair_threshold']:.3f} "
                f"(best accuracy on validation pairs) | {extra['pair_verification_accuracy']:.4f} |\n"
                f"| one-shot identification rank-1 (one enrolled image per individual) | "
                f"{extra['one_shot_rank1']:.4f} ± {extra['one_shot_rank1_std']:.4f} |\n"
                f"| one-shot identification rank-5 | "
                f"{extra['one_shot_rank5']:.4f} ± {extra['one_shot_rank5_std']:.4f} |\n"
            )
    return SpeciesEvaluation(
        test.species, result.threshold, result, report, extra, calibration_individuals, warnings, open_set
    )


def run_protocols(
    embed: Callable[[Shard], np.ndarray],
    config: TrainConfig,
    val: Shard,
    test: Shard,
    strangers: Shard | None,
) -> tuple[EvaluationResult, dict[str, float]]:
    """The study protocol (threshold calibrated on ``val``) and the DogFaceNet paper's, on test
    individuals, with the embeddings ``embed`` gives each shard."""
    val_emb, test_emb = embed(val), embed(test)
    kwargs: dict[str, Any] = {}
    if strangers is not None:
        kwargs["strangers_emb"] = embed(strangers)
        kwargs["strangers_individuals"] = np.array(strangers.individuals)
    result = evaluate_embeddings(
        test_emb,
        np.array(test.individuals),
        np.array(test.groups),
        threshold=calibrate_threshold(val_emb, np.array(val.individuals), config.target_far),
        n_repeats=config.eval_repeats,
        unknown_fraction=config.unknown_fraction,
        seed=config.seed,
        **kwargs,
    )
    return result, paper_protocols(val_emb, val, test_emb, test, config)


def paper_protocols(
    val_emb: np.ndarray, val: Shard, test_emb: np.ndarray, test: Shard, config: TrainConfig
) -> dict[str, float]:
    """The DogFaceNet paper's verification accuracy and one-shot identification, on test individuals.

    Pairs and queries within one group (two frames of a clip) are left out, as in the main protocol.
    """
    pair_threshold = accuracy_threshold(val_emb, np.array(val.individuals), config.seed, np.array(val.groups))
    test_individuals, test_groups = np.array(test.individuals), np.array(test.groups)
    one_shot = one_shot_identification(
        test_emb, test_individuals, config.seed, config.eval_repeats, test_groups
    )
    return {
        "pair_threshold": round(pair_threshold, 4),
        "pair_verification_accuracy": round(
            pair_verification_accuracy(test_emb, test_individuals, pair_threshold, config.seed, test_groups),
            4,
        ),
        "one_shot_rank1": round(one_shot["rank1"]["mean"], 4),
        "one_shot_rank1_std": round(one_shot["rank1"]["std"], 4),
        "one_shot_rank5": round(one_shot["rank5"]["mean"], 4),
        "one_shot_rank5_std": round(one_shot["rank5"]["std"], 4),
    }


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    species: list[str] | None = None,
    fp16: bool | None = None,
) -> list[Path]:
    """Export one artifact per species of a finished run: ``<out_dir>/<species>/``."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT_FILE)
    config = build_config(state["config"])
    out_root = Path(out_dir) if out_dir else run_dir / "artifacts"
    device = resolve_device(config.device)
    spec = preprocess_spec(config)
    model = bare_model(config)
    model.load_state_dict(state["model"])
    model.eval().to(device)
    data = prepare_data(config, spec)
    strangers = load_strangers(config, spec)
    written = []
    for d in data:
        if species and d.species not in species:
            continue
        target = out_root / d.species
        card = _card(d, spec, config, state, run_dir, model)
        _evaluate_into_card(card, model, config, d, strangers_of(strangers, d.species), target, config.name)
        export_artifact(model, card, target, fp16=config.fp16_export if fp16 is None else fp16)
        log.info("exported %s to %s", d.species, target)
        written.append(target)
    return written


def _evaluate_into_card(
    card: ModelCard,
    model: EmbeddingModel,
    config: TrainConfig,
    d: SpeciesData,
    strangers: Shard | None,
    target: Path,
    title: str,
) -> None:
    """Calibrate and evaluate on the split's validation and test individuals (report in
    ``target/report``) and record the threshold, metrics, open-set table and warnings in ``card``.
    A model trained on its test individuals too (``train_on_test``) is calibrated only."""
    if config.train_on_test:
        _calibrate_into_card(card, model, config, d.val)
        return
    spec = card.preprocess
    evaluation = evaluate_species(
        model,
        spec,
        config,
        d.val,
        d.test,
        strangers,
        target / "report",
        f"{title}: {d.species}",
        card.to_dict() | {"weights_sha256": "(see card)"},
    )
    card.threshold = evaluation.threshold
    card.threshold_far = config.target_far
    card.metrics = evaluation.metrics()
    card.open_set = evaluation.open_set
    card.warnings = evaluation.warnings
    if d.held is not None:
        closed = evaluate_held_back(model, spec, d.train, d.held, evaluation.threshold)
        with evaluation.report.open("a") as fh:
            fh.write(side_by_side(evaluation.result.summary(), closed.summary(), evaluation.threshold))
        card.metrics["closed_set"] = closed.summary()


def _calibrate_into_card(card: ModelCard, model: EmbeddingModel, config: TrainConfig, val: Shard) -> None:
    """The threshold and open-set table of a release model (no test individuals left), from the
    validation individuals; its card says where its test figures are to be found."""
    emb = embed_pixels(model, val.pixels, card.preprocess, next(model.parameters()).device)
    individuals = len(set(val.individuals))
    card.threshold = calibrate_threshold(emb, np.array(val.individuals), config.target_far)
    card.threshold_far = config.target_far
    card.open_set = open_set_table(emb, val, config)
    card.metrics = {"calibration_individuals": individuals, "test_individuals": 0}
    card.warnings = calibration_warnings(individuals) + [RELEASE_NOTE]
    log.info(
        "%s: trained on its test individuals too; calibrated on %d validation individuals",
        card.species,
        individuals,
    )


# The card's note on a model trained on every individual but its validation ones.
RELEASE_NOTE = (
    "trained on its test individuals too (train_on_test), so it has no test figures of its own; "
    "they are those of the same recipe trained without them (metrics.study_split, when recorded)"
)


def with_study_figures(card: ModelCard, study: ModelCard) -> ModelCard:
    """A release model's card with the test figures of the same recipe on the study split
    (``study``: a model trained without the test individuals), under ``metrics.study_split``."""
    if card.metrics.get("test_individuals", None) != 0:
        raise ValueError(f"{card.model_version or 'the model'} has test figures of its own")
    if not study.metrics.get("top1"):
        raise ValueError(f"{study.model_version} has no test figures to borrow")
    figures = {"model_version": study.model_version} | study.metrics
    return replace(card, metrics=card.metrics | {"study_split": figures})


def fuse_artifacts(
    paths: list[str | Path],
    out_dir: str | Path,
    weights: list[float] | None = None,
    fp16: bool = False,
    device: str = "auto",
) -> Path:
    """One artifact of several models of one species fused (training/fusion.py), evaluated and
    calibrated on their split like an exported run.

    Every model must have the same validation and test individuals (the same data, seed and
    fractions), so none of them saw an animal the fused model is tested on; the first model's
    training configuration is the fused card's, and each branch keeps its own (a fine-tune of the
    fused model trains each trained network on its own recipe).
    """
    if len(paths) < 2:
        raise ValueError("fuse needs at least two artifacts")
    torch_device = resolve_device(device)
    loaded = [load_artifact(p, torch_device) for p in paths]
    cards = [item.card for item in loaded]
    if len({c.species for c in cards}) != 1:
        raise ValueError(f"the models are of different species: {sorted({c.species for c in cards})}")
    nets = []
    for item in loaded:
        if not isinstance(item.model, EmbeddingNet):
            raise ArtifactError(f"{item.path} is itself a fused model: fuse its networks directly")
        nets.append(item.model)
    release = any(card_config(c).train_on_test for c in cards)
    for card in cards[1:]:
        # A release network (trained on the test individuals too) makes a release model: only the
        # validation individuals, which calibrate it, must then be new to every network.
        parts: tuple[Literal["val", "test"], ...] = ("val",) if release else ("val", "test")
        for part in parts:
            if _individuals(split_part(card, part)) != _individuals(split_part(cards[0], part)):
                raise ValueError(
                    f"{card.model_version} and {cards[0].model_version} were trained on different splits "
                    f"(their {part} individuals differ): the fused model's "
                    f"{'calibration' if part == 'val' else 'test'} animals must be new to all"
                )
    held = {(card_config(c).holdout_sessions, card_config(c).seed) for c in cards}
    if len(held) > 1 and any(share for share, _ in held):
        # The fused model's closed-set queries (the first model's held-back sessions) must be
        # sessions no network trained on.
        raise ValueError(
            "the models held back different sessions of their training animals for the closed-set "
            f"evaluation ((holdout_sessions, seed): {sorted(held)}): train them with the same"
        )
    shares = normalised_weights(list(weights or []), len(loaded))
    branches = [Branch.of(c, w) for c, w in zip(cards, shares, strict=True)]
    model = fused_from(list(zip(nets, branches, strict=True))).to(torch_device)
    config = card_config(cards[0])
    config = replace(
        config,
        datasets=tuple(d for d in config.datasets if d.species in (None, cards[0].species)),
        train_on_test=release,
    )
    (d,) = [d for d in prepare_data(config, model.preprocess) if d.species == cards[0].species]
    card = ModelCard(
        species=cards[0].species,
        embedding_dim=model.embedding_dim,
        preprocess=model.preprocess,
        architecture=FUSION_ARCHITECTURE,
        pretrained="fusion of " + ", ".join(f"{c.model_version} ({c.pretrained})" for c in cards),
        training_config=cards[0].training_config | {"train_on_test": release} | fusion_record(branches),
        dataset_fingerprint=d.fingerprint,
        fusion=branches,
    )
    target = Path(out_dir)
    _evaluate_into_card(
        card,
        model,
        config,
        d,
        strangers_of(load_strangers(config, model.preprocess), d.species),
        target,
        "fusion",
    )
    export_artifact(model, card, target, fp16=fp16)
    log.info("fused %s into %s", ", ".join(c.model_version for c in cards), target)
    return target


def _individuals(dataset: Dataset) -> set[str]:
    return {s.individual for s in dataset.samples}


def _card(
    d: SpeciesData, spec: PreprocessSpec, config: TrainConfig, state: dict, run_dir: Path, model: EmbeddingNet
) -> ModelCard:
    return ModelCard(
        species=d.species,
        embedding_dim=model.embedding_dim,
        preprocess=spec,
        architecture=model.architecture,
        pretrained=pretrained_source(config),
        training_config=config.to_dict()
        | {"epochs_trained": int(state["epoch"]) + 1, "run_dir": str(run_dir)},
        dataset_fingerprint=d.fingerprint,
    )


# What a card's training_config records beyond the run's options: the epochs trained, the run's
# folder, a fine-tuned model's lineage, a fused model's sources and weights.
CARD_ONLY_KEYS = ("epochs_trained", "run_dir", "lineage", "fused_from", "fusion_weights")


def card_config(card: ModelCard) -> TrainConfig:
    """The configuration an artifact was trained with, as its model card records it."""
    return build_config({k: v for k, v in card.training_config.items() if k not in CARD_ONLY_KEYS})


def held_out(card: ModelCard, source: str | Path | None = None) -> Dataset:
    """Every photo of the artifact's test individuals: never seen in training, by its own split.

    ``source`` reads the same data from another place than the one recorded at training time.
    A release model (trained on its test individuals too) has none: that is an error.
    """
    refuse_release(card)
    return split_part(card, "test", source)


def refuse_release(card: ModelCard) -> None:
    """A release model has no test individuals of its own to evaluate on: say what to do instead."""
    if card_config(card).train_on_test:
        raise ValueError(
            f"{card.model_version} was trained on its test individuals too (train_on_test): evaluate it "
            "on other data (--dataset SOURCE --all-individuals), or the same recipe trained without them"
        )


def split_part(card: ModelCard, part: Literal["val", "test"], source: str | Path | None = None) -> Dataset:
    """Every photo of the artifact's validation or test individuals, by the split it was trained with."""
    dataset, split = trained_on(card, source)
    keep = set(getattr(split, part))
    return Dataset(tuple(s for s in dataset.samples if s.individual in keep), dataset.source)


def trained_on(card: ModelCard, source: str | Path | None = None) -> tuple[Dataset, IndividualSplit]:
    """The artifact's dataset of its species as its training read it (group key and excluded
    individuals included: every training, validation and test individual), and the run's split.

    ``source`` reads the same data from another place than the one recorded at training time.
    """
    config = card_config(card)
    species = card.relabelled_from or card.species
    # A dataset configured without a species takes it from its manifest: read to find out.
    for ds_cfg in (d for d in config.datasets if d.species in (None, species)):
        if source is not None:
            ds_cfg = replace(ds_cfg, source=str(source))
        dataset, split = split_dataset(config, ds_cfg)
        if dataset.samples and dataset.samples[0].species == species:
            return dataset, split
    raise ValueError(f"no dataset of species {species!r} in the model's training configuration")


def stranger_dataset(config: TrainConfig, source: str | Path | None = None) -> Dataset | None:
    """The configured strangers (animals never trained on nor enrolled), or None."""
    if config.strangers is None:
        return None
    s = config.strangers
    return load_dataset(
        source if source is not None else s.source,
        species=s.species,
        group_pattern=s.group_pattern,
        exclude_individuals=s.exclude_individuals,
    )


def regrouped(config: TrainConfig, group_pattern: str | None) -> TrainConfig:
    """The same data with another group key (None: every image is its own group)."""
    return replace(config, datasets=tuple(replace(d, group_pattern=group_pattern) for d in config.datasets))


def evaluate_artifact(
    artifact: str | Path,
    out_dir: str | Path,
    datasets: list[DatasetConfig] | None = None,
    strangers: DatasetConfig | None = None,
    device: str = "auto",
    ignore_groups: bool = False,
    group_pattern: str | None = None,
    as_species: str | None = None,
) -> SpeciesEvaluation:
    """Evaluate an exported model on the test individuals of its training split (or given data).

    ``ignore_groups`` enrols and queries images at random within each individual, as studies that
    split video frames at random do: near-duplicate frames then sit on both sides, so the figures
    are optimistic. It exists to compare with such studies. ``group_pattern`` replaces the group
    key the model was trained with (e.g. one that recognises more file-naming schemes). Neither
    changes the split of individuals.
    """
    if ignore_groups and group_pattern:
        raise ValueError("give either ignore_groups or group_pattern, not both")
    loaded = load_artifact(artifact, resolve_device(device))
    card = loaded.card
    if as_species is not None and as_species != card.species:
        card = replace(card, species=as_species, relabelled_from=card.relabelled_from or card.species)
    config = card_config(card)
    if datasets:
        # Other data: its individuals were not trained on, whatever the model's own split held.
        config = replace(config, datasets=tuple(datasets), train_on_test=False)
        others = sorted({d.species for d in datasets if d.species not in (None, card.species)})
        if others and len(others) == len(datasets):
            raise ValueError(
                f"the data is of species {', '.join(map(repr, others))} but the model is for "
                f"{card.species!r}; to use this model for another species, say so with --as-species"
            )
    else:
        refuse_release(card)
    if strangers:
        config = replace(config, strangers=strangers)
    if ignore_groups or group_pattern:
        config = regrouped(config, group_pattern)
    config = replace(config, datasets=tuple(d for d in config.datasets if d.species in (None, card.species)))
    prepared = prepare_data(config, card.preprocess)
    data = [d for d in prepared if d.species == card.species]
    if not data:
        found = sorted({d.species for d in prepared})
        raise ValueError(
            f"no dataset of species {card.species!r} in the evaluation configuration (found "
            f"{', '.join(map(repr, found)) or 'none'}; to use this model for another species, say so "
            "with --as-species)"
        )
    return evaluate_species(
        loaded.model,
        card.preprocess,
        config,
        data[0].val,
        data[0].test,
        strangers_of(load_strangers(config, card.preprocess), card.species),
        Path(out_dir),
        f"{card.model_version}",
        card.to_dict(),
    )
