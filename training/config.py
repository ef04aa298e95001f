"""Training configuration: one frozen, typed object from YAML plus command-line overrides.

Precedence, lowest first: dataclass defaults, the chosen preset, the YAML file, command-line
options. The resolved configuration is saved next to the weights (``config.yaml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from training.backbones import get_backbone
from training.model import NECKS, parse_architecture


@dataclass(frozen=True)
class DatasetConfig:
    source: str = field(
        metadata={"help": "manifest CSV (path,individual,species) or folder of per-individual folders"}
    )
    species: str | None = field(default=None, metadata={"help": "species name (required for folders)"})
    group_pattern: str | None = field(
        default=None, metadata={"help": "regex over file names whose first group keys near-duplicate frames"}
    )
    exclude_individuals: str | None = field(
        default=None, metadata={"help": "regex of individual ids to leave out"}
    )
    weight: float = field(default=1.0, metadata={"help": "share of each batch in joint training"})

    @classmethod
    def parse(cls, text: str) -> DatasetConfig:
        """``SOURCE`` or ``SOURCE:SPECIES`` (command-line form)."""
        source, _, species = text.partition(":")
        return cls(source=source, species=species or None)


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    name: str = field(default="run", metadata=_h("run name; outputs go to OUT_DIR/NAME"))
    datasets: tuple[DatasetConfig, ...] = field(default=(), metadata=_h("datasets; several = joint training"))
    out_dir: str = field(default="runs", metadata=_h("where run folders are written"))
    cache_dir: str | None = field(
        default="runs/cache", metadata=_h("decoded-image shard cache; empty = none")
    )
    preset: str = field(default="fast", metadata=_h("optimisation recipe: 'fast' or 'study'"))
    backbone: str = field(
        default="resnet18",
        metadata=_h("resnet18 | resnet34 | resnet50 | efficientnet_lite0 | efficientnet_lite2"),
    )
    pretrained: str = field(
        default="none",
        metadata=_h("backbone start: none | imagenet | PATH of a state dict (safetensors or .pth)"),
    )
    neck: str = field(
        default="linear_bn",
        metadata=_h("linear_bn (trained, to embedding_dim) | identity (pooled features) | svd_fc"),
    )
    normalization: str = field(
        default="auto",
        metadata=_h("auto (the pretrained weights' own; 0.5/0.5 from scratch) | imagenet | symmetric"),
    )
    backbone_lr_scale: float | None = field(
        default=None, metadata=_h("backbone lr = lr x this; empty = 0.1 when pretrained, else 1")
    )
    head_only_epochs: int | None = field(
        default=None, metadata=_h("first epochs with the backbone frozen; empty = 1 when pretrained, else 0")
    )
    input_size: int | None = field(
        default=None,
        metadata=_h("input height in pixels (and width unless input_width); empty = the backbone's default"),
    )
    input_width: int | None = field(
        default=None, metadata=_h("input width in pixels, for non-square crops; empty = input_size")
    )
    embedding_dim: int = field(default=512, metadata=_h("embedding size"))
    dropout: float = field(default=0.0, metadata=_h("dropout before the embedding layer"))
    loss: str = field(default="arcface", metadata=_h("arcface | cosface | triplet"))
    scale: float = field(default=32.0, metadata=_h("logit scale s of ArcFace/CosFace"))
    margin: float = field(
        default=0.5, metadata=_h("ArcFace: radians; CosFace: cosine units; triplet: cosine-similarity margin")
    )
    margin_warmup_epochs: int = field(
        default=0, metadata=_h("ArcFace/CosFace: raise the margin linearly from 0 over these epochs")
    )
    optimizer: str = field(default="sgd", metadata=_h("sgd | adamw"))
    lr: float = field(default=0.1, metadata=_h("peak learning rate"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=_h("weight decay"))
    batch_size: int = field(default=128, metadata=_h("images per optimiser step, over all processes"))
    epochs: int = field(default=30, metadata=_h("training epochs"))
    schedule: str = field(default="cosine", metadata=_h("cosine | step"))
    step_size: int = field(default=10, metadata=_h("step schedule: epochs between decays"))
    gamma: float = field(default=0.5, metadata=_h("step schedule: decay factor"))
    warmup_epochs: int = field(default=1, metadata=_h("linear warm-up epochs"))
    samples_per_individual: int = field(
        default=0, metadata=_h("K of P x K batches (triplet needs >= 2); 0 = plain shuffling")
    )
    hflip: bool = field(
        default=True, metadata=_h("random horizontal flips (off for asymmetric coat patterns)")
    )
    augment: bool = field(default=True, metadata=_h("random shifts and brightness/contrast jitter"))
    rotate_degrees: float = field(default=0.0, metadata=_h("random rotations of up to +- this many degrees"))
    zoom: float = field(default=0.0, metadata=_h("random zoom by a factor within 1 +- zoom"))
    erase_probability: float = field(
        default=0.0, metadata=_h("share of images with a random rectangle blanked (random erasing)")
    )
    val_fraction: float = field(default=0.1, metadata=_h("fraction of individuals held out for validation"))
    test_fraction: float = field(default=0.2, metadata=_h("fraction of individuals held out for testing"))
    train_fraction: float = field(
        default=1.0, metadata=_h("share of the training individuals to train on (val and test unchanged)")
    )
    train_on_test: bool = field(
        default=False,
        metadata=_h(
            "also train on the test individuals (a release model: its test figures are those of the same "
            "recipe without this; validation stays held out for calibration)"
        ),
    )
    seed: int = field(default=0, metadata=_h("seed of splits, sampling, augmentation and initialisation"))
    device: str = field(default="auto", metadata=_h("auto | cpu | cuda"))
    amp: bool = field(default=True, metadata=_h("bf16 mixed precision on CUDA (ignored on CPU)"))
    channels_last: bool = field(default=True, metadata=_h("channels-last memory format"))
    threads: int = field(default=0, metadata=_h("CPU threads for torch (0 = torch default)"))
    init_from: str | None = field(default=None, metadata=_h("artifact dir to initialise the backbone from"))
    imprint_head: bool = field(
        default=False,
        metadata=_h(
            "start each class of a margin head at the mean embedding of its training photos (fine-tuning "
            "from init_from: the loss starts where the model already is)"
        ),
    )
    freeze_stages: int = field(
        default=0,
        metadata=_h("freeze the first N stages (ResNet: stem, layer1-4; Lite: stem, stage1-7, head)"),
    )
    cache_features: bool = field(
        default=False,
        metadata=_h(
            "freeze the whole backbone and train the neck and head on its features, computed once "
            "(a metric learnt on frozen features; of the augmentations only the mirror image is kept)"
        ),
    )
    distill_from: str | None = field(
        default=None,
        metadata=_h("artifact dir of a teacher whose embeddings the model also learns from (distillation)"),
    )
    distill_weight: float = field(
        default=1.0, metadata=_h("weight of the distillation loss next to the margin loss")
    )
    target_far: float = field(
        default=1e-3, metadata=_h("false-accept rate the decision threshold is set for")
    )
    holdout_sessions: float = field(
        default=0.0,
        metadata=_h(
            "share of each training individual's sessions (group key) held back for the closed-set "
            "evaluation; 0 = none"
        ),
    )
    eval_repeats: int = field(default=5, metadata=_h("random enrol/query splits in evaluation"))
    unknown_fraction: float = field(default=0.25, metadata=_h("test individuals never enrolled (open set)"))
    strangers: DatasetConfig | None = field(
        default=None, metadata=_h("extra never-seen animals used as open-set queries in evaluation")
    )
    skip_bad: bool = field(
        default=False, metadata=_h("skip (and count) bad manifest rows instead of failing")
    )
    fp16_export: bool = field(default=False, metadata=_h("export weights in float16"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the model's input: what the run's PreprocessSpec is built from."""
        height = self.input_size or get_backbone(self.backbone).default_input
        return (height, self.input_width or height)

    @property
    def starts_pretrained(self) -> bool:
        """The backbone starts from learnt weights (ImageNet, a state dict or an artifact)."""
        return self.pretrained != "none" or self.init_from is not None

    @property
    def backbone_lr(self) -> float:
        """The backbone's share of the learning rate (``backbone_lr_scale`` or its default)."""
        if self.backbone_lr_scale is not None:
            return self.backbone_lr_scale
        return 0.1 if self.pretrained != "none" else 1.0

    @property
    def head_only(self) -> int:
        """Epochs at the start that train the neck and head only (``head_only_epochs`` or default)."""
        if self.head_only_epochs is not None:
            return self.head_only_epochs
        return 1 if self.pretrained != "none" and self.epochs > 1 else 0


PRESETS: dict[str, dict[str, Any]] = {
    # The study's recipe: SGD, lr 0.01 halved every 10 epochs, batch 300, 100 epochs.
    "study": {
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "batch_size": 300,
        "epochs": 100,
        "schedule": "step",
        "step_size": 10,
        "gamma": 0.5,
        "warmup_epochs": 0,
    },
    # Faster default: larger peak lr with warm-up and cosine decay, a third of the epochs.
    "fast": {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "batch_size": 128,
        "epochs": 30,
        "schedule": "cosine",
        "warmup_epochs": 1,
    },
}


def _coerce(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value)
    if tp is DatasetConfig:
        if isinstance(value, DatasetConfig):
            return value
        if isinstance(value, str):
            return DatasetConfig.parse(value)
        return DatasetConfig(**value)
    if origin is tuple:
        (item,) = [a for a in get_args(tp) if a is not Ellipsis]
        return tuple(_coerce(item, v) for v in value)
    if tp is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return tp(value)


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Apply the preset named in ``values`` under ``values``, check names and types."""
    hints = get_type_hints(TrainConfig)
    unknown = set(values) - set(hints)
    if unknown:
        raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
    preset = values.get("preset", "fast")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    merged = {**PRESETS[preset], **_start_architecture(values), **values}
    config = TrainConfig(**{k: _coerce(hints[k], v) for k, v in merged.items()})
    _validate(config)
    return config


def _start_architecture(values: dict[str, Any]) -> dict[str, Any]:
    """Backbone, neck and embedding size of the ``init_from`` artifact (of a fused artifact, its
    trained network's), for a run that names none.

    Fine-tuning from a model means its architecture; saying so again is only needed to change it
    (which the run then refuses, naming both).
    """
    source = values.get("init_from")
    card = Path(source) / "model_card.json" if source else None
    if card is None or not card.is_file() or {"backbone", "neck"} & set(values):
        return {}
    from training.artifact import ArtifactError, ModelCard  # artifact imports config's neighbours
    from training.fusion import start_branch

    try:
        data = json.loads(card.read_text())
        if data.get("fusion"):  # a fused model: the network a run starts from (training.fusion)
            fused = ModelCard.from_dict(data)
            data = fused.fusion[start_branch(fused)].to_dict()  # type: ignore[index]
        backbone, neck = parse_architecture(str(data["architecture"]))
        return {"backbone": backbone, "neck": neck, "embedding_dim": int(data["embedding_dim"])}
    except (OSError, ValueError, KeyError, TypeError, ArtifactError):
        return {}  # the run's own check reports an unreadable artifact


def _validate(c: TrainConfig) -> None:
    if c.loss not in ("arcface", "cosface", "triplet"):
        raise ValueError(f"loss must be arcface, cosface or triplet, not {c.loss!r}")
    if c.loss == "triplet" and c.samples_per_individual < 2:
        raise ValueError("the triplet loss needs samples_per_individual >= 2 (P x K batches)")
    if c.samples_per_individual >= 2 and c.batch_size % c.samples_per_individual:
        raise ValueError(
            f"batch_size {c.batch_size} must be a multiple of samples_per_individual "
            f"{c.samples_per_individual}, or P x K batches split an individual's K images"
        )
    if c.margin_warmup_epochs < 0 or (c.margin_warmup_epochs and c.loss == "triplet"):
        raise ValueError("margin_warmup_epochs must be >= 0, and applies to arcface and cosface only")
    if c.schedule not in ("cosine", "step"):
        raise ValueError(f"schedule must be cosine or step, not {c.schedule!r}")
    if c.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be sgd or adamw, not {c.optimizer!r}")
    if c.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {c.device!r}")
    if not (0 <= c.rotate_degrees <= 180 and 0 <= c.zoom < 1 and 0 <= c.erase_probability <= 1):
        raise ValueError("rotate_degrees must be in [0, 180], zoom in [0, 1) and erase_probability in [0, 1]")
    if not 0 <= c.holdout_sessions < 1:
        raise ValueError(f"holdout_sessions must be in [0, 1), not {c.holdout_sessions}")
    if not 0 < c.train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], not {c.train_fraction}")
    if c.train_on_test and c.train_fraction < 1:
        raise ValueError("train_on_test trains on every individual but validation: leave train_fraction at 1")
    get_backbone(c.backbone)
    if c.neck not in NECKS:
        raise ValueError(f"neck must be one of {', '.join(NECKS)}, not {c.neck!r}")
    if c.neck == "svd_fc" and c.pretrained != "imagenet":
        raise ValueError("the svd_fc neck is made from the ImageNet classifier: set pretrained: imagenet")
    if c.normalization not in ("auto", "imagenet", "symmetric"):
        raise ValueError(f"normalization must be auto, imagenet or symmetric, not {c.normalization!r}")
    if c.backbone_lr < 0 or c.head_only < 0 or c.head_only > c.epochs:
        raise ValueError("backbone_lr_scale must be >= 0 and head_only_epochs between 0 and epochs")
    if c.cache_features and (not c.starts_pretrained or c.neck == "identity"):
        raise ValueError(
            "cache_features trains a neck on a frozen pretrained backbone: it needs pretrained weights "
            "or init_from, and a trained neck (linear_bn or svd_fc)"
        )
    if c.distill_weight < 0 or (c.distill_from and c.cache_features):
        raise ValueError(
            "distill_weight must be >= 0, and distill_from trains a whole network (no cache_features)"
        )
    if c.epochs < 1 and not c.starts_pretrained:
        raise ValueError("epochs 0 (evaluate the start as it is) needs pretrained weights or init_from")
    if c.batch_size < 2 or c.epochs < 0 or min(c.input_shape) < 32:
        raise ValueError("batch_size >= 2, epochs >= 0 and input_size, input_width >= 32 are required")


def load_yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the configuration must be a YAML mapping")
    return data


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per configuration field, with the field's help text."""
    parser.add_argument("--config", type=Path, help="YAML configuration file (options below override it)")
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="SOURCE[:SPECIES]",
        help="dataset source; repeat for joint training (replaces the YAML datasets list)",
    )
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in ("datasets", "strangers"):
            continue
        tp = hints[f.name]
        base = [a for a in get_args(tp) if a is not type(None)][0] if get_origin(tp) else tp
        flag = "--" + f.name.replace("_", "-")
        kind = "true|false" if base is bool else base.__name__
        parser.add_argument(
            flag,
            dest=f"cfg_{f.name}",
            default=None,
            type=base if base in (int, float) else str,
            metavar=kind.upper(),
            help=f"{f.metadata.get('help', '')}{_default_text(f.default)}",
        )
    parser.add_argument(
        "--strangers",
        metavar="SOURCE[:SPECIES]",
        help="extra never-seen animals used as open-set queries in evaluation",
    )


def _default_text(value: Any) -> str:
    """`` (default: X)`` for a help line; nothing for an unset (None) default."""
    if value is None:
        return ""
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    return f" (default: {shown})"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            values[key[4:]] = value
    if getattr(args, "dataset", None):
        values["datasets"] = [DatasetConfig.parse(d) for d in args.dataset]
    if getattr(args, "strangers", None):
        values["strangers"] = DatasetConfig.parse(args.strangers)
    return build_config(values)
