"""Fusion: networks trained on different data, served as one model.

A :class:`FusedEmbeddingNet` holds several embedding networks (e.g. the ImageNet-pretrained Lite2
and the ResNet18 trained on dog faces here). Each branch sees the photo at its own input size and
normalisation, resized from the fused model's input inside the network, so the service preprocesses
once, as for any model. The branches' L2-normalised embeddings are concatenated, branch ``i``
scaled by sqrt(w_i) with the weights summing to 1: the cosine similarity of two fused embeddings is
then the weighted mean of the branches' cosine similarities.

``fuse_artifacts`` builds one from artifacts of the same species and split; the result is an
ordinary artifact (safetensors plus a model card whose ``fusion`` lists the branches), evaluated
and calibrated on its validation and test individuals like an exported run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from training.model import FUSION_ARCHITECTURE, EmbeddingModel, EmbeddingNet, parse_architecture
from training.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from training.artifact import ModelCard


@dataclass(frozen=True)
class Branch:
    """One fused network: its architecture, width, own preprocessing, weight and source model."""

    architecture: str
    embedding_dim: int
    preprocess: PreprocessSpec
    weight: float
    source: str  # model_version of the artifact it came from
    # The source card's training configuration, so that the network can be fine-tuned on its own
    # recipe; None on cards fused before it was recorded.
    training_config: dict[str, Any] | None = None

    @classmethod
    def of(cls, card: ModelCard, weight: float) -> Branch:
        """The entry of a standalone model's artifact fused at ``weight``."""
        return cls(
            card.architecture,
            card.embedding_dim,
            card.preprocess,
            weight,
            card.model_version,
            dict(card.training_config) or None,
        )

    @property
    def trains(self) -> bool:
        """Whether its recipe trains the network: a frozen-feature one (0 epochs) keeps its weights."""
        return int((self.training_config or {}).get("epochs", 0)) > 0

    def to_dict(self) -> dict[str, Any]:
        data = {
            "architecture": self.architecture,
            "embedding_dim": self.embedding_dim,
            "input_size": list(self.preprocess.input_size),
            "normalization": {"mean": list(self.preprocess.mean), "std": list(self.preprocess.std)},
            "weight": self.weight,
            "source": self.source,
        }
        if self.training_config is not None:  # cards without it are written as before
            data["training_config"] = self.training_config
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], version: str) -> Branch:
        return cls(
            architecture=str(data["architecture"]),
            embedding_dim=int(data["embedding_dim"]),
            preprocess=PreprocessSpec(
                input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
                mean=tuple(float(v) for v in data["normalization"]["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["normalization"]["std"]),  # type: ignore[arg-type]
                version=version,
            ),
            weight=float(data["weight"]),
            source=str(data["source"]),
            training_config=None if data.get("training_config") is None else dict(data["training_config"]),
        )


class FusedEmbeddingNet(EmbeddingModel):
    """Branches' weighted, L2-normalised embeddings concatenated (module docstring).

    ``preprocess`` is how the input arrives (the fused model card's); each branch's input is made
    from it by undoing that normalisation, resizing (bilinear, antialiased) and normalising its way.
    Grad-CAM and LayerCAM read the layers of the heaviest branch.
    """

    def __init__(self, branches: list[Branch], preprocess: PreprocessSpec) -> None:
        super().__init__()
        if len(branches) < 2:
            raise ValueError("a fusion needs at least two networks")
        if any(b.weight <= 0 for b in branches) or not math.isclose(sum(b.weight for b in branches), 1.0):
            raise ValueError(
                f"fusion weights must be positive and sum to 1, got {[b.weight for b in branches]}"
            )
        self.specs = list(branches)
        self.preprocess = preprocess
        nets = []
        for b in branches:
            backbone, neck = parse_architecture(b.architecture)
            nets.append(EmbeddingNet(b.embedding_dim, backbone=backbone, neck=neck))
        self.branches = nn.ModuleList(nets)
        self.embedding_dim = sum(b.embedding_dim for b in branches)
        self._primary = max(range(len(branches)), key=lambda i: branches[i].weight)

    @property
    def architecture(self) -> str:
        return FUSION_ARCHITECTURE

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.net(self._primary).gradcam_layer

    @property
    def fine_gradcam_layer(self) -> nn.Module:
        return self.net(self._primary).fine_gradcam_layer

    def net(self, i: int) -> EmbeddingNet:
        """Branch ``i``'s network."""
        net = self.branches[i]
        assert isinstance(net, EmbeddingNet)
        return net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * _channels(self.preprocess.std, images) + _channels(self.preprocess.mean, images)
        parts = []
        for i, spec in enumerate(self.specs):
            x = pixels
            if spec.preprocess.input_size != tuple(pixels.shape[-2:]):
                x = F.interpolate(x, size=spec.preprocess.input_size, mode="bilinear", antialias=True)
            x = (x - _channels(spec.preprocess.mean, x)) / _channels(spec.preprocess.std, x)
            parts.append(F.normalize(self.net(i)(x), dim=1) * math.sqrt(spec.weight))
        return torch.cat(parts, dim=1)


def _channels(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def fused_from(models: list[tuple[EmbeddingNet, Branch]]) -> FusedEmbeddingNet:
    """A fused model of trained networks; its input is the largest branch's (the heaviest's, on a tie)."""
    branches = [b for _, b in models]
    largest = max(branches, key=lambda b: (b.preprocess.input_size[0] * b.preprocess.input_size[1], b.weight))
    fused = FusedEmbeddingNet(branches, largest.preprocess)
    for i, (net, _) in enumerate(models):
        fused.branches[i].load_state_dict(net.state_dict())
    return fused.eval()


def fusion_record(branches: list[Branch]) -> dict[str, Any]:
    """What a fused card's training configuration adds to its first network's: sources and weights."""
    return {"fused_from": [b.source for b in branches], "fusion_weights": [b.weight for b in branches]}


def trainable_branches(card: ModelCard) -> list[int]:
    """The networks of a fused card that a fine-tune trains: those whose recipe trained (epochs > 0).

    ValueError saying why when there are none, or when the card does not record every network's
    recipe (fused before it did), so that a frozen network cannot be told from a trained one.
    """
    branches = card.fusion or []
    if not branches or any(b.training_config is None for b in branches):
        raise ValueError(
            f"the fused model {card.model_version} does not record each network's training "
            "configuration (fused before cards did): fuse its networks again to fine-tune it"
        )
    trained = [i for i, b in enumerate(branches) if b.trains]
    if not trained:
        raise ValueError(
            f"no network of the fused model {card.model_version} was trained (all are frozen "
            "features, 0 epochs): there is nothing to fine-tune"
        )
    return trained


def start_branch(card: ModelCard) -> int:
    """The network of a fused card that a run initialised from it (``init_from``) starts from: its
    trained network, the heaviest if several (the part that learnt the species; a frozen ImageNet
    network is had from ``pretrained: imagenet`` directly). ValueError as :func:`trainable_branches`."""
    assert card.fusion is not None
    return max(trainable_branches(card), key=lambda i: card.fusion[i].weight)  # type: ignore[index]


def export_branch(
    net: EmbeddingNet,
    card: ModelCard,
    index: int,
    out: Path,
    training_config: dict[str, Any] | None = None,
) -> ModelCard:
    """Write ``net`` as branch ``index`` of fused ``card``, a standalone artifact in ``out``; its card.

    The card carries the branch's architecture, preprocessing and recipe (``training_config``, else
    the branch's own), so the ordinary fine-tune path can start from it.
    """
    from training.artifact import ModelCard, export_artifact  # artifact imports this module

    assert card.fusion is not None
    branch = card.fusion[index]
    standalone = ModelCard(
        species=card.species,
        embedding_dim=branch.embedding_dim,
        preprocess=branch.preprocess,
        architecture=branch.architecture,
        training_config=dict(training_config or branch.training_config or {}),
    )
    export_artifact(net, standalone, out)
    return standalone


def refit(
    model: FusedEmbeddingNet,
    card: ModelCard,
    tuned: dict[int, tuple[EmbeddingNet, dict[str, Any]]],
    out: Path,
) -> FusedEmbeddingNet:
    """``model`` (of ``card``) with the networks ``tuned`` ({index: new network and the configuration
    that trained it}) in place of its own; weights and preprocessing stay. Each tuned network is
    written as an artifact in ``out/network-<index>``, which its branch names as its source."""
    replaced = {
        i: (net, Branch.of(export_branch(net, card, i, out / f"network-{i}", config), model.specs[i].weight))
        for i, (net, config) in tuned.items()
    }
    return fused_from([replaced.get(i, (model.net(i), spec)) for i, spec in enumerate(model.specs)])


def normalised_weights(weights: list[float], count: int) -> list[float]:
    """``weights`` scaled to sum to 1 (equal weights when none are given)."""
    weights = weights or [1.0] * count
    if len(weights) != count or any(w <= 0 for w in weights):
        raise ValueError(f"give one positive weight per model ({count}), got {weights}")
    return [w / sum(weights) for w in weights]
