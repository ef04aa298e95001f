"""A fine-tune job: learn the enrolled animals, then let the data decide whether to serve the result.

1. **Export** the species' gallery (:mod:`service.services.gallery_export`) into the job's folder;
   the enrolment batch of each photo is its session.
2. **Train** from the serving model (or another artifact of the models folder) on the gallery, with
   part of each animal's enrolment batches held back (:func:`training.closed_set.hold_back_sessions`).
   The run checkpoints every epoch in the job's folder, so a job taken over after its worker died
   resumes where the checkpoint left it.
3. **Judge** the serving model (champion) and the new one (challenger) on the *same* held-back
   sessions, with the training photos as gallery, at the species' threshold.
4. **Promote** only when the challenger wins by the configured margins on top-1 and on the
   false-match rate at that threshold: a new artifact (card with metrics and lineage) replaces
   ``<models_dir>/<species>/`` (the old one moves to ``<models_dir>/.retired/``), and the service
   switches to it with its re-embedding (:mod:`service.services.model_watch` notices the new
   version, or ``POST /species/{name}/reload``).

A fused start (:mod:`training.fusion`) trains each of its trained networks on its own recipe, from
its own weights, and keeps its frozen-feature networks as they are; the challenger is the fused
model re-assembled with the same weights and preprocessing, judged and promoted like any other.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from service.errors import InvalidRequest
from service.image_store import ImageStore
from service.schemas_jobs import FinetuneRequest
from service.services.gallery_export import MANIFEST, export_gallery
from training.artifact import ArtifactError, LoadedModel, ModelCard, export_artifact, load_artifact, read_card
from training.closed_set import evaluate_held_back
from training.config import DatasetConfig, TrainConfig, build_config
from training.fusion import FusedEmbeddingNet, export_branch, fusion_record, refit, trainable_branches
from training.pipeline import card_config
from training.train import CHECKPOINT_FILE, fit, load_checkpoint, prepare_data

log = logging.getLogger(__name__)

Net = TypeVar("Net", bound=nn.Module)

Report = Callable[[dict[str, Any]], None]
"""Stores a job's progress; raises to stop the job (cancelled, or the worker is stopping)."""


@dataclass(frozen=True)
class FinetunePolicy:
    epochs: int
    lr: float
    holdout: float
    min_top1_gain: float
    min_far_drop: float
    threads: int
    device: str
    default_threshold: float


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
    return FinetunePolicy(
        epochs=request.epochs or policy.epochs,
        lr=request.lr or policy.lr,
        holdout=request.holdout or policy.holdout,
        min_top1_gain=policy.min_top1_gain,
        min_far_drop=policy.min_far_drop,
        threads=policy.threads,
        device=policy.device,
        default_threshold=policy.default_threshold,
    )


def finetune_config(
    card: ModelCard, manifest: Path, work: Path, start: Path, policy: FinetunePolicy
) -> TrainConfig:
    """The start model's own training recipe, pointed at the gallery: every animal trains (no
    validation or test individuals), part of its sessions held back, from the start model's weights."""
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
            "val_fraction": 0.0,
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
    threshold = champion.card.threshold if champion.card.threshold is not None else policy.default_threshold
    runs = training_runs(start, start_dir, gallery / MANIFEST, work, policy)
    config = runs[0].config  # the runs hold back the same sessions; the card records the first
    (data,) = prepare_data(config, start.card.preprocess)
    if data.held is None:
        raise InvalidRequest(
            f"no {species} has photos from two enrolment batches: nothing can be held back to judge "
            "a new model"
        )
    progress: dict[str, Any] = {"stage": "train", "epoch": 0, "epochs": config.epochs}
    report(progress)
    for run in runs:
        fit(run.config, resume=True, on_epoch=_epoch_reporter(report, progress))
    progress["stage"] = "evaluate"
    report(progress)
    challenger = _challenger(start, runs, work / "tuned")
    champion_result = _judge(champion, config, threshold)
    challenger_result = evaluate_held_back(
        challenger, start.card.preprocess, data.train, data.held, threshold
    ).summary()
    top1_gain = challenger_result["top1"] - champion_result["top1"]
    far_drop = champion_result["test_far"] - challenger_result["test_far"]
    kept_because = []
    if top1_gain < policy.min_top1_gain:
        kept_because.append(f"top-1 gain {top1_gain:.4f} is below the margin {policy.min_top1_gain}")
    if far_drop < policy.min_far_drop:
        kept_because.append(f"false-match rate drop {far_drop:.4f} is below the margin {policy.min_far_drop}")
    if champion.card.open_set is not None:
        # The job cannot calibrate the new model for animals nobody enrolled (it has no strangers
        # the new model has not trained on), and without its table the service would decide with
        # the pair threshold: a promoted cattle model measured that way answered `match` to 54% of
        # never-enrolled cows against 3% (docs/results.md).
        kept_because.append(
            "the serving model has an open-set calibration (thresholds by gallery size) that the new "
            "model would not have"
        )
    promote = not kept_because
    lineage = {
        "job_id": str(job_id),
        "parent_model_version": champion.card.model_version,
        "start_model_version": start.card.model_version,
        "gallery_images": len(data.train.individuals) + len(data.held.individuals),
        "gallery_individuals": len(data.classes),
        "held_back_images": len(data.held.individuals),
        "gallery_fingerprint": data.fingerprint,
    }
    result: dict[str, Any] = {
        "threshold": threshold,
        "champion": {"model_version": champion.card.model_version, "closed_set": champion_result},
        "challenger": {"closed_set": challenger_result},
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
        fusion = challenger.specs if isinstance(challenger, FusedEmbeddingNet) else None
        card = ModelCard(
            species=species,
            embedding_dim=start.card.embedding_dim,
            preprocess=start.card.preprocess,
            threshold=threshold,
            threshold_far=champion.card.threshold_far,
            metrics={
                "closed_set": challenger_result,
                "champion_closed_set": champion_result,
                "parent_metrics": champion.card.metrics,
            },
            training_config=config.to_dict()
            | (fusion_record(fusion) if fusion else {})
            | {"epochs_trained": config.epochs, "lineage": lineage},
            dataset_fingerprint=data.fingerprint,
            architecture=start.card.architecture,
            fusion=fusion,
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


def _judge(champion: LoadedModel, config: TrainConfig, threshold: float) -> dict[str, Any]:
    """The champion on the held-back sessions, its photos prepared its own way."""
    (data,) = prepare_data(config, champion.card.preprocess)
    assert data.held is not None
    return evaluate_held_back(
        champion.model, champion.card.preprocess, data.train, data.held, threshold
    ).summary()


def install_artifact(models_dir: Path, species: str, staging: Path, old_version: str) -> Path:
    """Swap ``staging`` in as ``<models_dir>/<species>``; the old one moves to ``.retired/``."""
    live = models_dir / species
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    retired = models_dir / ".retired" / f"{old_version}-{stamp}"
    retired.parent.mkdir(parents=True, exist_ok=True)
    os.replace(live, retired)
    os.replace(staging, live)
    return retired
