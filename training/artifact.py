"""The model artifact: ``model.safetensors`` plus ``model_card.json`` in one directory.

Loading reads safetensors and JSON only; nothing is ever unpickled. The card pins the weights'
SHA-256, so a truncated or swapped weights file is refused rather than served.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training import __version__
from training.fusion import Branch, FusedEmbeddingNet
from training.model import ARCHITECTURE, FUSION_ARCHITECTURE, EmbeddingModel, EmbeddingNet, parse_architecture
from training.open_set import HerdCalibration, OpenSetCalibration
from training.preprocess import PREPROCESS_VERSION, PreprocessSpec

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
FORMAT_VERSION = 1


class ArtifactError(Exception):
    """An artifact directory is missing, incomplete, corrupt or of an unknown format."""


@dataclass
class ModelCard:
    species: str
    embedding_dim: int
    preprocess: PreprocessSpec
    threshold: float | None = None  # cosine similarity; None until calibrated
    threshold_far: float | None = None  # the false-accept rate it was chosen for (validation)
    metrics: dict[str, Any] = field(default_factory=dict)
    # What a reader must know before trusting the figures (e.g. a threshold resting on few animals).
    warnings: list[str] = field(default_factory=list)
    training_config: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str = ""
    architecture: str = ARCHITECTURE  # <backbone>-gap-<neck>
    pretrained: str = "none"  # where the backbone's starting weights came from
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    code_version: str = field(default_factory=lambda: code_version())
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    # Thresholds per gallery size and target FPIR, and the confidence curve (training/open_set.py);
    # None for cards written before open-set calibration existed.
    open_set: OpenSetCalibration | None = None
    # The species the weights were trained for, when the card was relabelled for another one.
    relabelled_from: str | None = None
    # A fused model's networks (architecture fusion-concat): each one's architecture, width,
    # preprocessing, weight and source model (training/fusion.py).
    fusion: list[Branch] | None = None
    # A deployment's herd check of this model's open-set table (training/open_set.py): raises the
    # table's thresholds where the enrolled animals are more alike than its validation animals.
    herd: HerdCalibration | None = None

    @property
    def backbone(self) -> str:
        """The backbone's name; ``fusion`` for several networks fused."""
        if self.architecture == FUSION_ARCHITECTURE:
            return "fusion"
        return parse_architecture(self.architecture)[0]

    @property
    def model_version(self) -> str:
        """Identifies the weights: embeddings from different versions are never compared."""
        return f"{self.species}-{self.weights_sha256[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "species": self.species,
            "model_version": self.model_version,
            "architecture": self.architecture,
            "backbone": self.backbone,
            "pretrained": self.pretrained,
            "embedding_dim": self.embedding_dim,
            "input_size": list(self.preprocess.input_size),
            "normalization": {"mean": list(self.preprocess.mean), "std": list(self.preprocess.std)},
            "preprocessing_version": self.preprocess.version,
            "threshold": self.threshold,
            "threshold_far": self.threshold_far,
            "metrics": self.metrics,
            "warnings": self.warnings,
            "training_config": self.training_config,
            "dataset_fingerprint": self.dataset_fingerprint,
            "created_at": self.created_at,
            "code_version": self.code_version,
            "weights_sha256": self.weights_sha256,
            "weights_dtype": self.weights_dtype,
            "open_set": None if self.open_set is None else self.open_set.to_dict(),
            "relabelled_from": self.relabelled_from,
            "fusion": None if self.fusion is None else [b.to_dict() for b in self.fusion],
            "herd": None if self.herd is None else self.herd.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        try:
            if int(data["format_version"]) != FORMAT_VERSION:
                raise ArtifactError(f"unsupported model card format_version {data['format_version']}")
            spec = PreprocessSpec(
                input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
                mean=tuple(float(v) for v in data["normalization"]["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["normalization"]["std"]),  # type: ignore[arg-type]
                version=str(data["preprocessing_version"]),
            )
            return cls(
                species=str(data["species"]),
                embedding_dim=int(data["embedding_dim"]),
                preprocess=spec,
                threshold=None if data.get("threshold") is None else float(data["threshold"]),
                threshold_far=None if data.get("threshold_far") is None else float(data["threshold_far"]),
                metrics=dict(data.get("metrics") or {}),
                warnings=[str(w) for w in data.get("warnings") or []],
                training_config=dict(data.get("training_config") or {}),
                dataset_fingerprint=str(data.get("dataset_fingerprint", "")),
                architecture=str(data["architecture"]),
                pretrained=str(data.get("pretrained", "none")),
                created_at=str(data["created_at"]),
                code_version=str(data.get("code_version", "")),
                weights_sha256=str(data["weights_sha256"]),
                weights_dtype=str(data.get("weights_dtype", "float32")),
                open_set=OpenSetCalibration.from_dict(data["open_set"]) if data.get("open_set") else None,
                relabelled_from=None if data.get("relabelled_from") is None else str(data["relabelled_from"]),
                fusion=[Branch.from_dict(b, spec.version) for b in data["fusion"]]
                if data.get("fusion")
                else None,
                herd=HerdCalibration.from_dict(data["herd"]) if data.get("herd") else None,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(f"invalid model card: {exc!r}") from exc


@dataclass
class LoadedModel:
    model: EmbeddingModel
    card: ModelCard
    path: Path


def code_version() -> str:
    """The git commit this code runs from when known, else the package version."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    sha = out.stdout.strip()
    return f"{__version__}+g{sha}" if out.returncode == 0 and sha else __version__


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_artifact(model: EmbeddingModel, card: ModelCard, out_dir: str | Path, fp16: bool = False) -> Path:
    """Write weights (fp16 when asked: half the size, same embeddings to ~1e-3) and the card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    weights = out / WEIGHTS_FILE
    # Written beside and renamed into place, so a reader never hashes or loads a half-written file.
    partial = weights.with_suffix(".partial")
    save_file(state, str(partial), metadata={"species": card.species, "architecture": card.architecture})
    card.weights_sha256 = sha256_file(partial)
    # safetensors creates the file owner-only (0600); a service in a container runs as another
    # user and could not read it. Readable like the card beside it.
    partial.chmod(0o644)
    partial.replace(weights)
    card.weights_dtype = "float16" if fp16 else "float32"
    card.embedding_dim = model.embedding_dim
    (out / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n")
    return out


def write_card(card: ModelCard, out_dir: str | Path, weights_from: str | Path | None = None) -> Path:
    """Write ``card`` into ``out_dir``; with ``weights_from``, copy that artifact's weights beside it.

    The weights must be the ones the card pins: a card is never paired with other weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights_from is not None and Path(weights_from).resolve() != out.resolve():
        partial = (out / WEIGHTS_FILE).with_suffix(".partial")
        shutil.copyfile(Path(weights_from) / WEIGHTS_FILE, partial)
        partial.chmod(0o644)
        partial.replace(out / WEIGHTS_FILE)
    weights = out / WEIGHTS_FILE
    if not weights.is_file() or sha256_file(weights) != card.weights_sha256:
        raise ArtifactError(f"{weights} is missing or not the weights the card pins")
    partial_card = out / (CARD_FILE + ".partial")
    partial_card.write_text(json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n")
    partial_card.replace(out / CARD_FILE)
    return out


def read_card(path: str | Path) -> ModelCard:
    card_path = Path(path) / CARD_FILE
    if not card_path.is_file():
        raise ArtifactError(f"{card_path} is missing")
    try:
        data = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{card_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{card_path} must hold a JSON object")
    return ModelCard.from_dict(data)


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an exported model for inference (eval mode, float32) after checking its checksum."""
    root = Path(path)
    card = read_card(root)
    model = build_for_card(card)
    if card.preprocess.version != PREPROCESS_VERSION:
        raise ArtifactError(
            f"the model was trained with preprocessing version {card.preprocess.version!r}; this code "
            f"preprocesses as version {PREPROCESS_VERSION!r}, so its embeddings would not match"
        )
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing")
    actual = sha256_file(weights)
    if actual != card.weights_sha256:
        raise ArtifactError(
            f"{weights} has sha256 {actual[:12]}..., the card pins {card.weights_sha256[:12]}..."
        )
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise ArtifactError(f"{weights} is not a readable safetensors file: {exc}") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights} does not match {card.architecture}: {exc}") from exc
    model.eval().to(device)
    return LoadedModel(model=model, card=card, path=root)


def build_for_card(card: ModelCard) -> EmbeddingModel:
    """The network a card describes, with fresh weights (ArtifactError for an unknown one)."""
    try:
        if card.architecture == FUSION_ARCHITECTURE:
            if not card.fusion:
                raise ValueError("a fusion-concat card must list its networks under 'fusion'")
            return FusedEmbeddingNet(card.fusion, card.preprocess)
        backbone, neck = parse_architecture(card.architecture)
    except ValueError as exc:
        raise ArtifactError(
            f"{exc}: this code builds <backbone>-gap-<neck> and fusion-concat models"
        ) from exc
    return EmbeddingNet(embedding_dim=card.embedding_dim, backbone=backbone, neck=neck)
