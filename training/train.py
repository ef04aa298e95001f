"""Training: one shared backbone, one head per species, seeded, resumable, optionally distributed.

``fit(config)`` runs a whole training; ``train_one_epoch`` one pass. Launched under ``torchrun``
(``WORLD_SIZE`` > 1) it uses DistributedDataParallel: every optimiser step's batch is divided
between the processes, so the result does not depend on how many there are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.artifact import load_artifact, read_card
from training.augment import augment
from training.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYMMETRIC_MEAN,
    SYMMETRIC_STD,
    get_backbone,
    load_pretrained,
)
from training.closed_set import hold_back_sessions
from training.config import DatasetConfig, TrainConfig
from training.data import (
    Dataset,
    IndividualSplit,
    Shard,
    cached_shard,
    enrol_query_split,
    load_dataset,
    split_individuals,
)
from training.distill import relational_loss, teacher_targets
from training.evaluate import embed_pixels
from training.frozen_features import backbone_features, draw_views, neck_embeddings
from training.fusion import FusedEmbeddingNet, start_branch
from training.losses import ArcFaceHead, CosFaceHead, MarginLoss, build_loss
from training.metrics import identification_ranks, similarity, topk_accuracy
from training.model import (
    EmbeddingNet,
    freeze_stages,
    set_backbone_trainable,
    set_frozen_eval,
    stage_names,
)
from training.preprocess import PreprocessSpec, normalize, on_device

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class SpeciesData:
    """One species' pixels and the individual-disjoint split of a run."""

    species: str
    train: Shard
    val: Shard
    test: Shard
    classes: list[str]  # training individuals, in label order
    labels: torch.Tensor  # (len(train),) int64 class index
    weight: float
    fingerprint: str
    # Sessions of training individuals held back for the closed-set evaluation (holdout_sessions).
    held: Shard | None = None
    # cache_features: the frozen backbone's features of the training photos (N, views, F) and of
    # the validation photos (N, F), computed once.
    features: torch.Tensor | None = None
    val_features: torch.Tensor | None = None
    # distill_from: the teacher's embeddings of the training photos (N, D).
    teacher: torch.Tensor | None = None


def split_dataset(config: TrainConfig, ds_cfg: DatasetConfig) -> tuple[Dataset, IndividualSplit]:
    """One configured dataset and the run's seeded split of its individuals."""
    dataset = load_dataset(
        ds_cfg.source,
        species=ds_cfg.species,
        group_pattern=ds_cfg.group_pattern,
        exclude_individuals=ds_cfg.exclude_individuals,
        skip_bad=config.skip_bad,
    )
    split = split_individuals(
        dataset,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        train_fraction=config.train_fraction,
        train_on_test=config.train_on_test,
    )
    return dataset, split


def prepare_data(config: TrainConfig, spec: PreprocessSpec) -> list[SpeciesData]:
    if not config.datasets:
        raise ValueError("no datasets configured (give --dataset or 'datasets:' in the YAML file)")
    out: list[SpeciesData] = []
    for ds_cfg in config.datasets:
        dataset, split = split_dataset(config, ds_cfg)
        shard = cached_shard(dataset, spec, config.cache_dir or None)
        train = shard.subset(set(split.train))
        held = None
        if config.holdout_sessions > 0:
            sessions = hold_back_sessions(
                train.individuals, train.groups, config.holdout_sessions, config.seed
            )
            if len(sessions.held):
                held, train = train.take(sessions.held), train.take(sessions.train)
            log.info(
                "%s: %d photos of %d sessions held back for the closed set; %d individuals have one session",
                shard.species,
                len(sessions.held),
                len(set(held.groups)) if held else 0,
                len(sessions.single_session),
            )
        index = {name: i for i, name in enumerate(split.train)}
        labels = torch.tensor([index[i] for i in train.individuals], dtype=torch.int64)
        out.append(
            SpeciesData(
                species=shard.species,
                train=train,
                val=shard.subset(set(split.val)),
                test=shard.subset(set(split.test)),
                classes=list(split.train),
                labels=labels,
                weight=ds_cfg.weight,
                fingerprint=shard.fingerprint,
                held=held,
            )
        )
    names = [d.species for d in out]
    if len(set(names)) != len(names):
        raise ValueError(f"each species may appear once in a run, got {names}")
    return out


class TrainModule(nn.Module):
    """The embedding network plus one criterion (head) per species; returns the batch loss.

    ``on_features``: the inputs are the frozen backbone's features, and only the neck runs.
    ``targets`` (distillation): the teacher's embeddings of the batch's photos, whose relational
    loss at ``distill_scale``, times ``distill_weight``, is added.
    """

    def __init__(
        self,
        model: EmbeddingNet,
        criteria: dict[str, nn.Module],
        on_features: bool = False,
        distill_weight: float = 0.0,
        distill_scale: float = 32.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.criteria = nn.ModuleDict(criteria)
        self.on_features = on_features
        self.distill_weight = distill_weight
        self.distill_scale = distill_scale

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        species: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeddings = self.model.neck(inputs) if self.on_features else self.model(inputs)
        total = embeddings.new_zeros(())
        if targets is not None:
            total = total + self.distill_weight * relational_loss(embeddings, targets, self.distill_scale)
        for i, name in enumerate(self.criteria):
            mask = species == i
            count = int(mask.sum())
            if count:
                total = total + self.criteria[name](embeddings[mask], labels[mask]) * (count / len(labels))
        return total

    def _heads(self) -> list[ArcFaceHead | CosFaceHead]:
        return [c.head for c in self.criteria.values() if isinstance(c, MarginLoss)]

    def set_margin(self, margin: float) -> None:
        """Set the margin of every species' head (the triplet loss keeps its own)."""
        for head in self._heads():
            head.set_margin(margin)

    def margin(self) -> float:
        """The margin the heads train with now (they all share it)."""
        return self._heads()[0].margin


def start_card_preprocess(init_from: str) -> PreprocessSpec:
    """The preprocessing of the network a run initialised from ``init_from`` starts from (of a fused
    artifact, its trained network's: :func:`training.fusion.start_branch`)."""
    card = read_card(init_from)
    return card.fusion[start_branch(card)].preprocess if card.fusion else card.preprocess


def preprocess_spec(config: TrainConfig) -> PreprocessSpec:
    """The run's input size and normalisation (``auto``: what the start's weights were trained with)."""
    if config.normalization == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif config.normalization == "symmetric":
        mean, std = SYMMETRIC_MEAN, SYMMETRIC_STD
    elif config.init_from:
        source = start_card_preprocess(config.init_from)
        mean, std = source.mean, source.std  # type: ignore[assignment]
    else:
        mean, std = get_backbone(config.backbone).normalization(config.pretrained)  # type: ignore[assignment]
    return PreprocessSpec(input_size=config.input_shape, mean=mean, std=std)  # type: ignore[arg-type]


def bare_model(config: TrainConfig) -> EmbeddingNet:
    """The run's architecture with fresh weights (a checkpoint's state dict fits it)."""
    embedding_dim = 1000 if config.neck == "svd_fc" else config.embedding_dim
    return EmbeddingNet(embedding_dim, config.dropout, backbone=config.backbone, neck=config.neck)


def pretrained_source(config: TrainConfig) -> str:
    """Where the run's starting weights came from, in words, for the model card."""
    if config.init_from:
        return f"artifact {config.init_from}"
    if config.pretrained == "imagenet":
        return f"imagenet: {get_backbone(config.backbone).imagenet_source}"
    return config.pretrained


def build_model(config: TrainConfig) -> EmbeddingNet:
    """The network a run starts from: an artifact, or the chosen backbone with its pretrained weights.

    A run from an artifact takes every weight from it, so it reads no pretrained weights (they would
    all be overwritten, and reading them needs the `[pretrained]` extra, which the image lacks)."""
    model = bare_model(config)
    if config.init_from:
        start = load_artifact(config.init_from)
        source = start.model
        if isinstance(source, FusedEmbeddingNet):  # its trained network (training.fusion.start_branch)
            source = source.net(start_branch(start.card))
        if source.architecture != model.architecture:
            raise ValueError(
                f"init_from {config.init_from} is a {source.architecture} model; this run builds "
                f"{model.architecture} (set backbone, neck and embedding_dim to match)"
            )
        model.load_state_dict(source.state_dict())
        log.info("initialised backbone and neck from %s", config.init_from)
    elif config.pretrained != "none":
        classifier = load_pretrained(model.spec, model.backbone, config.pretrained)
        log.info("backbone %s starts from %s", config.backbone, config.pretrained)
        if config.neck == "svd_fc":
            if classifier is None:
                raise ValueError(f"{config.pretrained} has no classifier to make the svd_fc neck from")
            model.set_svd_fc(classifier)
    return model


def build_train_module(config: TrainConfig, data: list[SpeciesData]) -> tuple[TrainModule, list[str]]:
    model = build_model(config)
    frozen = freeze_stages(model, len(stage_names(model)) if config.cache_features else config.freeze_stages)
    criteria = {
        d.species: build_loss(config.loss, model.embedding_dim, len(d.classes), config.scale, config.margin)
        for d in data
    }
    module = TrainModule(
        model,
        criteria,
        on_features=config.cache_features,
        distill_weight=config.distill_weight,
        distill_scale=config.scale,
    )
    return module, frozen


def attach_teacher(config: TrainConfig, data: list[SpeciesData], device: torch.device) -> None:
    """Embed every training photo once with the ``distill_from`` teacher, at its own input size."""
    assert config.distill_from is not None
    teacher = load_artifact(config.distill_from, device)
    spec = teacher.card.preprocess
    for ds_cfg, d in zip(config.datasets, data, strict=True):
        dataset, _ = split_dataset(config, ds_cfg)
        shard = cached_shard(dataset, spec, config.cache_dir or None)
        rows = {path: i for i, path in enumerate(shard.paths)}
        d.teacher = teacher_targets(
            teacher.model, shard.pixels[[rows[p] for p in d.train.paths]], spec, device
        )
    log.info("distilling from %s (%s)", config.distill_from, teacher.card.architecture)


def cache_features(
    model: EmbeddingNet,
    data: list[SpeciesData],
    config: TrainConfig,
    spec: PreprocessSpec,
    device: torch.device,
) -> None:
    """Embed every training photo (and its mirror image when ``hflip``) and every validation photo
    once with the frozen backbone (``cache_features``)."""
    start = time.perf_counter()
    for d in data:
        d.features = backbone_features(model, d.train.pixels, spec, device, mirror=config.hflip)
        d.val_features = backbone_features(model, d.val.pixels, spec, device, mirror=False)[:, 0]
    count = sum(len(d.train.pixels) + len(d.val.pixels) for d in data)
    log.info(
        "cached the frozen backbone's features of %d photos in %.0f s", count, time.perf_counter() - start
    )


def gather_rows(per_species: Sequence[torch.Tensor], batch: np.ndarray) -> torch.Tensor:
    """The rows of a batch ((species index, sample index) pairs) from per-species tensors, in the
    batch's order: one indexing per species, not one slice per row."""
    species = torch.from_numpy(np.ascontiguousarray(batch[:, 0]))
    index = torch.from_numpy(np.ascontiguousarray(batch[:, 1]))
    first = per_species[int(species[0])]
    out = first.new_empty((len(batch), *first.shape[1:]))
    for s in species.unique().tolist():
        at = species == s
        out[at] = per_species[s][index[at]]
    return out


def _batch_inputs(
    data: list[SpeciesData],
    batch: np.ndarray,
    part: slice,
    generator: torch.Generator,
    config: TrainConfig,
    spec: PreprocessSpec,
    device: torch.device,
) -> torch.Tensor:
    """This process's inputs of a batch: cached features with a drawn view, or augmented pixels.

    The uint8 pixels are copied to the device first and augmented there (on a GPU the CPU only
    gathers and copies). Every process draws the whole batch's augmentation (same generator), then
    keeps its slice.
    """
    if config.cache_features:
        rows = batch.tolist()
        by_species = [draw_views(data[s].features, [i], generator) for s, i in rows]  # type: ignore[arg-type]
        return on_device(torch.cat(by_species)[part], device)
    pixels = augment(on_device(gather_rows([d.train.pixels for d in data], batch), device), generator, config)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    return normalize(pixels[part], spec).contiguous(memory_format=memory_format)


def training_embeddings(
    model: EmbeddingNet, d: SpeciesData, spec: PreprocessSpec, device: torch.device
) -> np.ndarray:
    """L2-normalised embeddings of a species' training photos (from the cached features when there are)."""
    if d.features is not None:
        return neck_embeddings(model, d.features[:, 0], device)
    return embed_pixels(model, d.train.pixels, spec, device)


def validation_embeddings(
    model: EmbeddingNet, d: SpeciesData, spec: PreprocessSpec, device: torch.device
) -> np.ndarray:
    """L2-normalised embeddings of a species' validation photos (from the cached features when there are)."""
    if d.val_features is not None:
        return neck_embeddings(model, d.val_features, device)
    return embed_pixels(model, d.val.pixels, spec, device)


def epoch_batches(data: list[SpeciesData], config: TrainConfig, epoch: int) -> list[np.ndarray]:
    """The epoch's batches as arrays of (species index, sample index) rows; seeded by (seed, epoch).

    One species: a shuffle (or P x K batches when ``samples_per_individual`` is set). Several
    species: every batch holds each species in proportion to its weight (smaller species cycle
    through their images more often), so a large species cannot crowd out a small one; an epoch
    is as many steps as all species' images fill.
    """
    rng = np.random.default_rng([config.seed, epoch])
    per_species = [_species_order(d, config, rng) for d in data]
    if len(data) == 1:
        order = per_species[0]
        # A dataset smaller than one batch (the study's batch of 300 on a small set) trains on all
        # of it at every step.
        size = min(config.batch_size, len(order))
        steps = max(1, len(order) // size)
        return [
            np.stack([np.zeros(size, np.int64), chunk], 1) for chunk in np.split(order[: steps * size], steps)
        ]
    weights = np.array([d.weight for d in data], dtype=np.float64)
    if (weights <= 0).any():
        raise ValueError("dataset weights must be positive")
    # Shares in whole P x K chunks, so no individual's K images straddle two batches.
    unit = max(1, config.samples_per_individual)
    # At least two images of every species (one chunk of K >= 2 with P x K batches).
    chunks = _integer_shares(weights / weights.sum(), config.batch_size // unit, 1 if unit > 1 else 2)
    shares = [unit * c for c in chunks]
    steps = max(1, sum(len(d.labels) for d in data) // config.batch_size)
    batches = []
    cursors = [0] * len(data)
    for _ in range(steps):
        rows = []
        for s, (order, share) in enumerate(zip(per_species, shares, strict=True)):
            take = np.take(order, np.arange(cursors[s], cursors[s] + share), mode="wrap")
            cursors[s] += share
            rows.append(np.stack([np.full(share, s, np.int64), take], 1))
        batches.append(np.concatenate(rows))
    return batches


def _integer_shares(fractions: np.ndarray, total: int, minimum: int) -> list[int]:
    """Whole shares of ``total`` in proportion to ``fractions`` (largest remainders), each at least
    ``minimum`` (taken from the largest shares), always adding up to ``total``."""
    if minimum * len(fractions) > total:
        raise ValueError(f"a batch of {total} cannot hold {minimum} of each of {len(fractions)} datasets")
    raw = fractions * total
    shares = np.floor(raw).astype(int)
    for i in np.argsort(raw - shares)[::-1][: total - shares.sum()]:
        shares[i] += 1
    while (shares < minimum).any():
        shares[np.argmax(shares)] -= 1
        shares[np.argmin(shares)] += 1
    return [int(s) for s in shares]


def _species_order(d: SpeciesData, config: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    k = config.samples_per_individual
    if k < 2:
        return rng.permutation(len(d.labels))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(d.labels.tolist()):
        by_class[label].append(i)
    chunks = []
    for idx in by_class.values():
        idx = list(rng.permutation(idx))
        if len(idx) < k:
            idx = list(rng.choice(idx, size=k, replace=True))
        for start in range(0, len(idx) - k + 1, k):
            chunks.append(idx[start : start + k])
    order = rng.permutation(len(chunks))
    return np.array([i for c in order for i in chunks[c]], dtype=np.int64)


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the peak learning rate during ``epoch`` (0-based)."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    if config.schedule == "step":
        return config.gamma ** (epoch // config.step_size)
    span = max(1, config.epochs - config.warmup_epochs)
    progress = (epoch - config.warmup_epochs) / span
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def margin_factor(config: TrainConfig, epoch: int) -> float:
    """Share of the full margin used during ``epoch`` (0-based): ramps up from 0 over the warm-up."""
    if epoch >= config.margin_warmup_epochs:
        return 1.0
    return epoch / config.margin_warmup_epochs


def build_optimizer(config: TrainConfig, module: TrainModule) -> torch.optim.Optimizer:
    """Two parameter groups: neck and heads at the full rate, the backbone at ``backbone_lr`` of it.

    Each group's ``lr_scale`` is what ``fit`` multiplies the scheduled rate by.
    """
    backbone = {id(p) for p in module.model.backbone.parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in backbone], "lr_scale": 1.0},
        {"params": [p for p in trainable if id(p) in backbone], "lr_scale": config.backbone_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def frozen_stages(model: EmbeddingNet, config: TrainConfig, epoch: int) -> list[str]:
    """Stages whose weights and BatchNorm statistics stay fixed during ``epoch`` (0-based)."""
    names = stage_names(model)
    return names if epoch < config.head_only else names[: config.freeze_stages]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size())


def train_one_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[SpeciesData],
    config: TrainConfig,
    spec: PreprocessSpec,
    epoch: int,
    device: torch.device,
    dist_info: DistInfo,
) -> dict[str, float]:
    """One pass; returns mean loss and training throughput (images/s over all processes)."""
    module.train()
    inner = module.module if isinstance(module, DistributedDataParallel) else module
    assert isinstance(inner, TrainModule)
    set_frozen_eval(inner.model, frozen_stages(inner.model, config, epoch))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    torch.manual_seed(config.seed * 1_000_003 + epoch + dist_info.rank)
    batches = epoch_batches(data, config, epoch)
    use_amp = config.amp and device.type == "cuda"
    # The loss is summed on the device: reading it every step would make the CPU wait for each GPU
    # step before it could gather and copy the next batch.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen, start = 0, time.perf_counter()
    bar = tqdm(
        batches,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="batch",
        leave=False,
        disable=not dist_info.is_main
        or not sys.stderr.isatty()
        and os.environ.get("ANIMALID_PROGRESS") != "1",
    )
    for batch in bar:
        part = process_share(len(batch), dist_info)
        inputs = _batch_inputs(data, batch, part, generator, config, spec, device)
        species = on_device(torch.from_numpy(batch[part, 0]), device)
        labels = on_device(gather_rows([d.labels for d in data], batch[part]), device)
        targets = None
        if config.distill_from:
            targets = on_device(gather_rows([d.teacher for d in data], batch[part]), device)  # type: ignore[misc]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = module(inputs, labels, species, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * len(labels)
        seen += len(labels)
        if not bar.disable:
            bar.set_postfix(
                loss=f"{float(loss.detach()):.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}"
            )
    totals = torch.stack([total_loss, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    if dist_info.world > 1:  # mean loss and image count over all processes
        dist.all_reduce(totals)
    loss_sum, seen = float(totals[0]), int(totals[1])
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "images_per_s": seen / elapsed, "time_s": elapsed}


def process_share(batch_len: int, dist_info: DistInfo) -> slice:
    """This process's contiguous part of a batch (all processes together cover it once).

    Contiguous, not interleaved: a P x K batch keeps each individual's K images together when the
    parts hold whole chunks, so the triplet loss still finds positives in every process; for a loss
    that is a per-image mean, equal parts give the one-process objective either way.
    """
    bounds = np.linspace(0, batch_len, dist_info.world + 1).round().astype(int)
    return slice(int(bounds[dist_info.rank]), int(bounds[dist_info.rank + 1]))


@torch.no_grad()
def imprint_heads(
    module: TrainModule, data: list[SpeciesData], spec: PreprocessSpec, device: torch.device
) -> None:
    """Set each class weight of every margin head to the normalised mean embedding of the class's
    training photos (weight imprinting): a head drawn at random would first pull a good starting
    model towards random directions."""
    for d in data:
        criterion = module.criteria[d.species]
        if not isinstance(criterion, MarginLoss):
            continue
        emb = torch.from_numpy(training_embeddings(module.model, d, spec, device))
        centres = torch.zeros_like(criterion.head.weight, device="cpu")
        centres.index_add_(0, d.labels, emb)
        criterion.head.weight.copy_(
            torch.nn.functional.normalize(centres, dim=1).to(criterion.head.weight.device)
        )
    module.train()


def validation_top1(
    model: EmbeddingNet, d: SpeciesData, spec: PreprocessSpec, device: torch.device, seed: int
) -> float:
    """Top-1 of the enrol-half / query-half protocol on validation individuals (one seeded split)."""
    shard = d.val
    if len(set(shard.individuals)) < 2:
        return float("nan")
    emb = validation_embeddings(model, d, spec, device)
    enrol, query = enrol_query_split(shard.individuals, shard.groups, random.Random(seed))
    labels = np.array(shard.individuals)
    ranks = identification_ranks(similarity(emb[query], emb[enrol]), labels[query], labels[enrol])
    return topk_accuracy(ranks, 1)


def save_checkpoint(
    path: Path,
    module: TrainModule,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrainConfig,
    data: list[SpeciesData],
) -> None:
    state = {
        "model": module.model.state_dict(),
        "criteria": module.criteria.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "config": config.to_dict(),
        "classes": {d.species: d.classes for d in data},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


EpochHook = Callable[[dict[str, Any]], None]


def fit(config: TrainConfig, resume: bool = False, on_epoch: EpochHook | None = None) -> Path:
    """Train per ``config``; returns the run directory holding ``checkpoint.pt`` and ``log.jsonl``.

    ``on_epoch`` gets each epoch's log record once its checkpoint is saved (a job reports progress
    and checks for cancellation there; an exception it raises ends the training, the checkpoint kept).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dist_info = init_distributed(device)
    if config.batch_size % dist_info.world:
        raise ValueError(f"batch_size {config.batch_size} must divide among {dist_info.world} processes")
    torch.manual_seed(config.seed)
    spec = preprocess_spec(config)
    data = prepare_data(config, spec)
    module, frozen = build_train_module(config, data)
    # On the device before the optimizer state is loaded: loading moves that state to where the
    # parameters are, and moving the module later would leave it behind on the CPU.
    module.to(device)
    if config.channels_last:
        module.to(memory_format=torch.channels_last)
    run_dir = config.run_dir
    checkpoint_path = run_dir / CHECKPOINT_FILE
    optimizer = build_optimizer(config, module)
    start_epoch = 0
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        module.model.load_state_dict(state["model"])
        module.criteria.load_state_dict(state["criteria"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        log.info("resumed %s at epoch %d", checkpoint_path, start_epoch + 1)
    if config.cache_features and start_epoch < config.epochs:
        cache_features(module.model, data, config, spec, device)
    if config.distill_from and start_epoch < config.epochs:
        attach_teacher(config, data, device)
    if config.imprint_head and start_epoch == 0:
        imprint_heads(module, data, spec, device)
    train_module: nn.Module = module
    if dist_info.world > 1:
        train_module = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=len(data) > 1,
        )
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    if config.epochs == 0 and dist_info.is_main:  # the start itself is the model: nothing to train
        save_checkpoint(checkpoint_path, module, optimizer, -1, config, data)
    for epoch in range(start_epoch, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, epoch) * group["lr_scale"]
        set_backbone_trainable(module.model, epoch >= config.head_only, frozen)
        module.set_margin(config.margin * margin_factor(config, epoch))
        stats = train_one_epoch(train_module, optimizer, data, config, spec, epoch, device, dist_info)
        if not dist_info.is_main:
            continue
        record = {"epoch": epoch + 1, "loss": round(stats["loss"], 5), "lr": optimizer.param_groups[0]["lr"]}
        if config.margin_warmup_epochs:
            record["margin"] = round(module.margin(), 5)
        for d in data:
            record[f"val_top1_{d.species}"] = round(
                validation_top1(module.model, d, spec, device, config.seed), 4
            )
        record["images_per_s"] = round(stats["images_per_s"], 1)
        record["time_s"] = round(stats["time_s"], 1)
        line = json.dumps(record)
        print(line, flush=True)
        with (run_dir / "log.jsonl").open("a") as fh:
            fh.write(line + "\n")
        save_checkpoint(checkpoint_path, module, optimizer, epoch, config, data)
        if on_epoch is not None:
            resumed_at = start_epoch + 1 if start_epoch else None
            on_epoch(record | {"epochs": config.epochs, "resumed_at": resumed_at})
    if dist_info.world > 1:
        _check_replicas_in_sync(module.model, device)
        dist.barrier()
    return run_dir


def _check_replicas_in_sync(model: nn.Module, device: torch.device) -> None:
    """Every process must hold the same weights after DDP training (else gradients were not shared)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if not all(torch.allclose(g, gathered[0], rtol=0, atol=1e-6) for g in gathered):
        raise RuntimeError("distributed replicas diverged: parameters differ between processes")
