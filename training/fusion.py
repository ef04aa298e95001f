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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.model import FUSION_ARCHITECTURE, EmbeddingModel, EmbeddingNet, parse_architecture
from training.preprocess import PreprocessSpec


@dataclass(frozen=True)
class Branch:
    """One fused network: its architecture, width, own preprocessing, weight and source model."""

    architecture: str
    embedding_dim: int
    preprocess: PreprocessSpec
    weight: float
    source: str  # model_version of the artifact it came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "embedding_dim": self.embedding_dim,
            "input_size": list(self.preprocess.input_size),
            "normalization": {"mean": list(self.preprocess.mean), "std": list(self.preprocess.std)},
            "weight": self.weight,
            "source": self.source,
        }

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
        return self._net(self._primary).gradcam_layer

    @property
    def fine_gradcam_layer(self) -> nn.Module:
        return self._net(self._primary).fine_gradcam_layer

    def _net(self, i: int) -> EmbeddingNet:
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
            parts.append(F.normalize(self._net(i)(x), dim=1) * math.sqrt(spec.weight))
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


def normalised_weights(weights: list[float], count: int) -> list[float]:
    """``weights`` scaled to sum to 1 (equal weights when none are given)."""
    weights = weights or [1.0] * count
    if len(weights) != count or any(w <= 0 for w in weights):
        raise ValueError(f"give one positive weight per model ({count}), got {weights}")
    return [w / sum(weights) for w in weights]
