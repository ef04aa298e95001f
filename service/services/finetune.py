"""A fine-tune job: learn the enrolled animals, then let the data decide whether to serve the result.

1. **Export** the species' gallery (:mod:`service.services.gallery_export`) into the job's folder;
   the enrolment batch of each photo is its session.
2. **Train** from the serving model (or another artifact of the models folder) on the gallery, with
   a share of the animals kept out altogether (:func:`strangers_share`) and part of each other
   animal's enrolment batches held back (:func:`training.closed_set.hold_back_sessions`). The run
   checkpoints every epoch in the job's folder, so a job taken over after its worker died resumes
   where the checkpoint left it.
3. **Calibrate** the challenger on the animals kept out, which it never saw: its pair threshold and
   open-set table (:func:`training.calibration.recalibrated`).
   **Judge** the serving model (champion) and the new one (challenger) on the *same* held-back
   sessions, with the training photos as gallery, each as the service would answer with it for the
   gallery's size (:func:`service.services.identification.operating_point`): its threshold, and the
   minimum match confidence that turns a doubtful match into ``uncertain``.
   Both are also asked, as the service would answer, about the photos of each animal kept out
   with that animal left out of the gallery (:func:`judge`): a newcomer to the herd.
4. **Promote** only when the challenger wins by the configured margins on top-1 and on the
   false-match rate (of image pairs) at those thresholds, has an open-set table if the champion
   has one, and answers ``match`` for the kept-out animals' photos no more often than the champion
   or :data:`STRANGER_TOLERANCE` times the target FPIR (:func:`kept_reasons`): a new artifact
   (card with metrics, calibration and lineage) replaces ``<models_dir>/<species>/`` (the old one
   moves to ``<models_dir>/.retired/``), and the service switches to it with its re-embedding
   (:mod:`service.services.model_watch` notices the new version, or ``POST /species/{name}/reload``).

A fused start (:mod:`training.fusion`) trains each of its trained networks on its own recipe, from
its own weights, and keeps its frozen-feature networks as they are; the challenger is the fused
model re-assembled with the same weights and preprocessing, judged and promoted like any other.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from service.errors import InvalidRequest
from service.image_store import ImageStore
from service.schemas_jobs import FinetuneRequest
from service.services.gallery_export import MANIFEST, export_gallery
from service.services.identification import Limits, OperatingPoint, operating_point
from training.artifact import ArtifactError, LoadedModel, ModelCard, export_artifact, load_artifact, read_card
from training.calibration import recalibrated
from training.closed_set import evaluate_closed_set, herd_mates_matched
from training.config import DatasetConfig, TrainConfig, build_config
from training.data import DatasetError, load_dataset
from training.evaluate import embed_pixels
from training.fusion import FusedEmbeddingNet, export_branch, fusion_record, refit, trainable_branches
from training.model import EmbeddingModel
from training.open_set import MIN_INDIVIDUALS
from training.pipeline import card_config
from training.preprocess import PreprocessSpec
from training.train import CHECKPOINT_FILE, SpeciesData, fit, load_checkpoint, prepare_data

log = logging.getLogger(__name__)

STRANGER_TOLERANCE = 1.5
"""A challenger may answer ``match`` for the kept-out animals' photos, were they not enrolled, up to
this many times the target FPIR (the open-set benchmarks' tolerance), or as often as the serving model."""

Net = TypeVar("Net", bound=nn.Module)

Report = Callable[[dict[str, Any]], None]
"""Stores a job's progress; raises to stop the job (cancelled, or the worker is stopping)."""


@dataclass(frozen=True)
class FinetunePolicy:
    epochs: int
    lr: float
    holdout: float
    strangers: float  # share of the gallery's animals kept out of training to calibrate the challenger
    min_top1_gain: float
    min_far_drop: float
    threads: int
    device: str
    limits: Limits  # how the service decides: each model is judged as it would answer


@dataclass(frozen=True)
class Run:
    """One network the job trains: its configuration, and which branch of a fused start it is."""

    config: TrainConfig
    branch: int | None = None


@dataclass(frozen=True)
class FinetuneEnv:
    sessions: sessionmaker[Session]
    store: ImageStore
    models_dir: Path
    jobs_dir: Path


def job_policy(request: FinetuneRequest, policy: FinetunePolicy) -> FinetunePolicy:
    """The settings' policy with what the request overrides."""
    return replace(
        policy,
        epochs=request.epochs or policy.epochs,
        lr=request.lr or policy.lr,
        holdout=request.holdout or policy.holdout,
        strangers=policy.strangers if request.strangers is None else request.strangers,
    )


def finetune_config(
    card: ModelCard, manifest: Path, work: Path, start: Path, policy: FinetunePolicy
) -> TrainConfig:
    """The start model's own training recipe, pointed at the gallery: every animal trains but the
    share ``policy.strangers`` kept out as validation individuals (they calibrate the new model for
    animals it never saw), part of its sessions held back, from the start model's weights."""
    base = card_config(card).to_dict() if card.training_config else {}
    height, width = card.preprocess.input_size
    return build_config(
        base
        | {
            "name": "finetune",
            "datasets": [DatasetConfig(source=str(manifest), species=card.species)],
            "strangers": None,
            "out_dir": str(work),
            "cache_dir": str(work / "cache"),
            "input_size": height,
            "input_width": width,
            "embedding_dim": card.embedding_dim,
            "epochs": policy.epochs,
            "lr": policy.lr,
            "warmup_epochs": 0,
            "margin_warmup_epochs": 0,
            "val_fraction": policy.strangers,
            "test_fraction": 0.0,
            "train_fraction": 1.0,
            "train_on_test": False,
            "holdout_sessions": policy.holdout,
            "init_from": str(start),
            "imprint_head": True,
            "threads": policy.threads,
            "device": policy.device,
        }
    )


def start_folder(models_dir: Path, species: str, start: str | None) -> Path:
    """The artifact folder a fine-tune of ``species`` starts from (``start``, else the serving
    model's), refused with :class:`InvalidRequest` when it is missing, unreadable, of another
    species, or a fused model with no network to fine-tune. Checked when the job is queued, so the
    caller gets a 422 instead of a job that fails, and again when it runs."""
    folder = models_dir / start if start else models_dir / species
    if not folder.is_dir():
        raise InvalidRequest(f"no artifact folder {folder.name!r} in the models folder", start=start)
    try:
        card = read_card(folder)
    except ArtifactError as exc:
        raise InvalidRequest(f"{folder.name} cannot be fine-tuned: {exc}", start=start) from exc
    if card.species != species:
        raise InvalidRequest(f"{folder.name} is a model of {card.species}, not {species}", start=start)
    if card.fusion:
        try:
            trainable_branches(card)
        except ValueError as exc:
            raise InvalidRequest(f"{folder.name} cannot be fine-tuned: {exc}", start=start) from exc
    return folder


def run_finetune(
    env: FinetuneEnv,
    job_id: uuid.UUID,
    species: str,
    request: FinetuneRequest,
    policy: FinetunePolicy,
    report: Report,
) -> dict[str, Any]:
    """Run (or resume) the job; returns what the job row records as its result."""
    began = time.perf_counter()
    policy = job_policy(request, policy)
    work = env.jobs_dir / str(job_id)
    gallery = work / "gallery"
    report({"stage": "export"})
    if not (gallery / MANIFEST).is_file():
        if gallery.exists():  # half written by a worker that died
            shutil.rmtree(gallery)
        with env.sessions() as session:
            exported = export_gallery(session, env.store, species, gallery)
        log.info(
            "job %s: exported %d images of %d %s", job_id, exported.images, exported.individuals, species
        )
    champion_dir = env.models_dir / species
    start_dir = start_folder(env.models_dir, species, request.start)
    champion = load_artifact(champion_dir)
    start = champion if start_dir == champion_dir else load_artifact(start_dir)
    enrolled = load_dataset(gallery / MANIFEST, species=species, verify_images=False)
    individuals = len({sample.individual for sample in enrolled.samples})
    policy = replace(policy, strangers=strangers_share(individuals, policy.strangers))
    runs = training_runs(start, start_dir, gallery / MANIFEST, work, policy)
    config = runs[0].config  # the runs hold back the same sessions; the card records the first
    data = _gallery_data(config, start.card, species)
    held = data.held
    assert held is not None  # _gallery_data refuses a gallery with nothing to hold back
    # the gallery's shape: images per individual -> individuals with that many
    photos = Counter([*data.train.individuals, *held.individuals, *data.val.individuals])
    shape = Counter(photos.values())
    gallery_images = photos.total()
    progress: dict[str, Any] = {"stage": "train", "epoch": 0, "epochs": config.epochs}
    report(progress)
    for run in runs:
        fit(run.config, resume=True, on_epoch=_epoch_reporter(report, progress))
    progress["stage"] = "evaluate"
    report(progress)
    challenger = _challenger(start, runs, work / "tuned")
    challenger_vectors = embedded(challenger, start.card.preprocess, data)
    card = _challenger_card(challenger_vectors, start.card, champion.card, config, policy)
    # Each model judged as the service would answer with it for this gallery, its photos prepared
    # its own way; both by their tables alone, since the challenger has no herd check yet.
    limits = policy.limits
    champion_point = operating_point(replace(champion.card, herd=None), limits, species, shape, None)
    challenger_point = operating_point(card, limits, species, shape, None)
    share = limits.stranger_share_for(species)
    (champion_data,) = prepare_data(config, champion.card.preprocess)
    champion_vectors = embedded(champion.model, champion.card.preprocess, champion_data)
    champion_result, champion_herd = judge(champion_vectors, champion_point, share)
    challenger_result, challenger_herd = judge(challenger_vectors, challenger_point, share)
    top1_gain = challenger_result["top1"] - champion_result["top1"]
    far_drop = champion_result["test_far"] - challenger_result["test_far"]
    target_fpir = limits.fpir_for(species) if card.open_set or champion.card.open_set else None
    kept_because = kept_reasons(
        policy,
        top1_gain,
        far_drop,
        champion.card.open_set is not None and card.open_set is None,
        (champion_herd, challenger_herd),
        target_fpir,
    )
    promote = not kept_because
    lineage = {
        "job_id": str(job_id),
        "parent_model_version": champion.card.model_version,
        "start_model_version": start.card.model_version,
        "gallery_images": gallery_images,
        "gallery_individuals": len(data.classes) + len(set(data.val.individuals)),
        "held_back_images": len(held.individuals),
        "calibration_individuals": len(set(data.val.individuals)),
        "gallery_fingerprint": data.fingerprint,
    }
    result: dict[str, Any] = {
        "gallery_images": gallery_images,
        "target_fpir": target_fpir,
        "champion": {
            "model_version": champion.card.model_version,
            "threshold": champion_point.threshold,
            "min_confidence": champion_point.min_confidence,
            "closed_set": champion_result,
            "herd_mates_matched": champion_herd,
        },
        "challenger": {
            "threshold": challenger_point.threshold,
            "min_confidence": challenger_point.min_confidence,
            "calibration": {
                "individuals": len(set(data.val.individuals)),
                "images": len(data.val.individuals),
                "pair_threshold": card.threshold,
                "open_set": card.open_set is not None,
                "kept_out": kept_out(gallery / MANIFEST, data.val.individuals),
            },
            "closed_set": challenger_result,
            "herd_mates_matched": challenger_herd,
        },
        "margins": {"min_top1_gain": policy.min_top1_gain, "min_far_drop": policy.min_far_drop},
        "top1_gain": round(top1_gain, 4),
        "far_drop": round(far_drop, 4),
        "kept_because": kept_because,
        "lineage": lineage,
        "epochs": config.epochs,
    }
    if promote:
        progress["stage"] = "promote"
        report(progress)
        card = replace(
            card,
            metrics=card.metrics
            | {
                "closed_set": challenger_result,
                "champion_closed_set": champion_result,
                "parent_metrics": champion.card.metrics,
            },
            training_config=card.training_config | {"lineage": lineage},
        )
        staging = env.models_dir / f".staging-{job_id}"
        if staging.exists():
            shutil.rmtree(staging)
        export_artifact(challenger, card, staging, fp16=champion.card.weights_dtype == "float16")
        retired = install_artifact(env.models_dir, species, staging, champion.card.model_version)
        result["challenger"]["model_version"] = card.model_version
        result["retired_to"] = str(retired)
    else:
        result["challenger"]["model_version"] = None
    result["decision"] = "promoted" if promote else "kept"
    result["wall_s"] = round(time.perf_counter() - began, 1)
    return result


def _gallery_data(config: TrainConfig, card: ModelCard, species: str) -> SpeciesData:
    """The exported gallery split as the job trains, calibrates and judges on it, refused with
    :class:`InvalidRequest` when it cannot be."""
    try:
        (data,) = prepare_data(config, card.preprocess)
    except DatasetError as exc:
        raise InvalidRequest(f"the {species} gallery cannot be split for a fine-tune: {exc}") from exc
    if data.held is None:
        raise InvalidRequest(
            f"no {species} has photos from two enrolment batches: nothing can be held back to judge "
            "a new model"
        )
    return data


def strangers_share(individuals: int, share: float) -> float:
    """``share`` of a gallery of ``individuals`` animals to keep out of training, or 0 when that would
    be fewer than an open-set table needs or leave fewer than two to train on."""
    kept_out = round(individuals * share)
    return share if kept_out >= MIN_INDIVIDUALS and individuals - kept_out >= 2 else 0.0


def kept_out(manifest: Path, individuals: Sequence[str]) -> list[str]:
    """The external ids (else the ids) of the exported ``individuals``: the animals a job kept out
    of training, which the new model has not learnt."""
    with manifest.open(newline="") as fh:
        names = {row["individual"]: row["external_id"] or row["individual"] for row in csv.DictReader(fh)}
    return sorted({names[i] for i in individuals})


def _challenger_card(
    challenger: Embedded,
    start: ModelCard,
    champion: ModelCard,
    config: TrainConfig,
    policy: FinetunePolicy,
) -> ModelCard:
    """The new model's card: the start's preprocessing and the champion's calibration, recalibrated
    (pair threshold and open-set table) on the gallery's animals kept out of training when there are
    at least two of them, since the new model has never seen them."""
    data = challenger.data
    fusion = challenger.model.specs if isinstance(challenger.model, FusedEmbeddingNet) else None
    card = ModelCard(
        species=champion.species,
        embedding_dim=start.embedding_dim,
        preprocess=start.preprocess,
        threshold=champion.threshold if champion.threshold is not None else policy.limits.default_threshold,
        threshold_far=champion.threshold_far,
        training_config=config.to_dict()
        | (fusion_record(fusion) if fusion else {})
        | {"epochs_trained": config.epochs},
        dataset_fingerprint=data.fingerprint,
        architecture=start.architecture,
        fusion=fusion,
    )
    if len(set(data.val.individuals)) < 2:
        return card
    far = champion.threshold_far or config.target_far
    return recalibrated(
        card, challenger.kept_out, data.val, far, config, "enrolled animals kept out of the fine-tune"
    )


def _epoch_reporter(report: Report, progress: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Updates ``progress`` from each epoch's record (the later stages keep its last values)."""
    times: list[float] = []

    def on_epoch(record: dict[str, Any]) -> None:
        times.append(float(record.get("time_s", 0.0)))
        left = int(record["epochs"]) - int(record["epoch"])
        progress.update(
            epoch=record["epoch"],
            loss=record["loss"],
            epoch_s=record.get("time_s"),
            eta_s=round(sum(times) / len(times) * left, 1),
            resumed_at_epoch=record.get("resumed_at"),
        )
        report(progress)

    return on_epoch


def training_runs(
    start: LoadedModel, start_dir: Path, manifest: Path, work: Path, policy: FinetunePolicy
) -> list[Run]:
    """What the job trains: the start model; for a fused start, each trained network from its own
    weights (exported into ``work/network-<i>``) on its own recipe, all with the first one's seed so
    that they hold back the same sessions (the challenger is judged on sessions none trained on)."""
    if not isinstance(start.model, FusedEmbeddingNet):
        return [Run(finetune_config(start.card, manifest, work, start_dir, policy))]
    runs: list[Run] = []
    for i in trainable_branches(start.card):  # start_folder refused a card without any
        folder = work / f"network-{i}"
        card = export_branch(start.model.net(i), start.card, i, folder / "start")
        config = finetune_config(card, manifest, folder, folder / "start", policy)
        runs.append(Run(replace(config, seed=runs[0].config.seed) if runs else config, i))
    return runs


def _challenger(start: LoadedModel, runs: list[Run], tuned: Path) -> Any:
    """The start model with the fine-tuned weights; a fused start re-assembled with its fine-tuned
    networks (each also written in ``tuned``)."""
    if not isinstance(start.model, FusedEmbeddingNet):
        (run,) = runs
        return _fine_tuned(start.model, run.config)
    nets = {}
    for run in runs:
        assert run.branch is not None
        nets[run.branch] = (
            _fine_tuned(start.model.net(run.branch), run.config),
            run.config.to_dict() | {"epochs_trained": run.config.epochs},
        )
    return refit(start.model, start.card, nets, tuned)


def _fine_tuned(model: Net, config: TrainConfig) -> Net:
    """``model`` (whatever its backbone) with the weights of ``config``'s run."""
    model = copy.deepcopy(model)
    model.load_state_dict(load_checkpoint(config.run_dir / CHECKPOINT_FILE)["model"])
    return model.eval()


@dataclass(frozen=True)
class Embedded:
    """A model's vectors of the exported photos, each embedded once: the training photos, the
    held-back ones and those of the animals kept out, as ``data`` splits them."""

    model: EmbeddingModel
    data: SpeciesData
    train: np.ndarray
    held: np.ndarray
    kept_out: np.ndarray  # (0, 0) when no animal was kept out


def embedded(model: EmbeddingModel, spec: PreprocessSpec, data: SpeciesData) -> Embedded:
    assert data.held is not None  # _gallery_data refuses a gallery with nothing to hold back
    device = next(model.parameters()).device
    kept_out = (
        embed_pixels(model, data.val.pixels, spec, device)
        if data.val.individuals
        else np.empty((0, 0), np.float32)
    )
    return Embedded(
        model,
        data,
        embed_pixels(model, data.train.pixels, spec, device),
        embed_pixels(model, data.held.pixels, spec, device),
        kept_out,
    )


def judge(
    vectors: Embedded, point: OperatingPoint, stranger_share: float | None
) -> tuple[dict[str, Any], float | None]:
    """A model as the service would answer with it at ``point``: on the held-back sessions, with the
    training photos as gallery (closed-set figures), and the share of the kept-out animals' photos
    answered ``match`` were these animals not enrolled, each left out of a gallery of every exported
    photo: how it would treat a newcomer to the herd (None when no animal was kept out)."""
    data = vectors.data
    assert data.held is not None
    floor = point.floor(stranger_share)
    closed = evaluate_closed_set(
        vectors.train,
        data.train.individuals,
        vectors.held,
        data.held.individuals,
        threshold=point.threshold,
        floor=floor,
    ).summary()
    if not data.val.individuals:
        return closed, None
    herd = herd_mates_matched(
        np.concatenate([vectors.train, vectors.held, vectors.kept_out]),
        [*data.train.individuals, *data.held.individuals, *data.val.individuals],
        sorted(set(data.val.individuals)),
        point.threshold,
        floor,
    )
    return closed, herd


def kept_reasons(
    policy: FinetunePolicy,
    top1_gain: float,
    far_drop: float,
    loses_open_set: bool,
    herd_mates: tuple[float | None, float | None],
    target_fpir: float | None,
) -> list[str]:
    """Why the challenger is not promoted (none: it is). ``herd_mates``: the champion's and the
    challenger's share of the kept-out animals' photos answered ``match`` (:func:`judge`)."""
    reasons = []
    if top1_gain < policy.min_top1_gain:
        reasons.append(f"top-1 gain {top1_gain:.4f} is below the margin {policy.min_top1_gain}")
    if far_drop < policy.min_far_drop:
        reasons.append(f"false-match rate drop {far_drop:.4f} is below the margin {policy.min_far_drop}")
    if loses_open_set:
        # Without its table the service would decide with the pair threshold: a promoted cattle
        # model without one answered `match` to 54% of never-enrolled cows against 3% (docs/results.md).
        reasons.append(
            "the serving model has an open-set calibration (thresholds by gallery size) that the new "
            f"model would not have: calibrating it needs at least {MIN_INDIVIDUALS} of the gallery's animals "
            "kept out of training (the strangers share), and two left to train on"
        )
    champion, challenger = herd_mates
    if champion is not None and challenger is not None and target_fpir is not None:
        allowed = max(champion, STRANGER_TOLERANCE * target_fpir)
        if challenger > allowed:
            reasons.append(
                f"it would answer `match` for {challenger:.1%} of the photos of the animals kept out of "
                f"training were they not enrolled, against {champion:.1%} for the serving model and a "
                f"target FPIR of {target_fpir:g} (at most {allowed:.1%})"
            )
    return reasons


def install_artifact(models_dir: Path, species: str, staging: Path, old_version: str) -> Path:
    """Swap ``staging`` in as ``<models_dir>/<species>``; the old one moves to ``.retired/``."""
    live = models_dir / species
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    retired = models_dir / ".retired" / f"{old_version}-{stamp}"
    retired.parent.mkdir(parents=True, exist_ok=True)
    os.replace(live, retired)
    os.replace(staging, live)
    return retired
