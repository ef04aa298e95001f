"""The embedding network: a backbone from :mod:`training.backbones`, pooled, and a neck.

The architecture string of a model card names both, ``<backbone>-gap-<neck>``; the design's
default is ``resnet18-gap-linear-bn`` (ResNet18, global average pooling, Linear + BatchNorm to a
512-D embedding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import DEFAULT_BACKBONE, Classifier, get_backbone, svd_fc

# linear_bn: Linear + BatchNorm to embedding_dim (trained); identity: the pooled features
# themselves; svd_fc: the pretrained classifier's weights orthonormalised by SVD (needs one).
NECKS = ("linear_bn", "identity", "svd_fc")
DEFAULT_NECK = "linear_bn"
# Several networks' embeddings concatenated (training/fusion.py).
FUSION_ARCHITECTURE = "fusion-concat"


def architecture_name(backbone: str, neck: str) -> str:
    return f"{backbone}-gap-{neck.replace('_', '-')}"


def parse_architecture(name: str) -> tuple[str, str]:
    """``<backbone>-gap-<neck>`` -> (backbone, neck); ValueError for anything else."""
    if name == FUSION_ARCHITECTURE:
        raise ValueError(
            f"{name} is several networks fused (training/fusion.py): train one of its branches and fuse again"
        )
    backbone, sep, neck = name.partition("-gap-")
    neck = neck.replace("-", "_")
    if not sep or neck not in NECKS:
        raise ValueError(f"unknown architecture {name!r}")
    get_backbone(backbone)
    return backbone, neck


ARCHITECTURE = architecture_name(DEFAULT_BACKBONE, DEFAULT_NECK)


class EmbeddingModel(nn.Module):
    """What evaluation and serving need of a model: raw embeddings from ``forward``, L2-normalised
    ones from ``embed``, their width, the architecture's name and the layers the maps read.
    :class:`EmbeddingNet` is one network; :class:`training.fusion.FusedEmbeddingNet` several."""

    embedding_dim: int

    @property
    def architecture(self) -> str:
        raise NotImplementedError

    @property
    def gradcam_layer(self) -> nn.Module:
        raise NotImplementedError

    @property
    def fine_gradcam_layer(self) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward(images), dim=1)


class EmbeddingNet(EmbeddingModel):
    """Backbone trunk (pooled features), then the neck to ``embedding_dim``.

    ``forward`` returns raw embeddings (what margin heads train on); ``embed`` returns the
    L2-normalised embeddings used for search. ``embedding_dim`` is the feature width for the
    ``identity`` neck and the classifier's class count for ``svd_fc``.
    """

    def __init__(
        self,
        embedding_dim: int = 512,
        dropout: float = 0.0,
        backbone: str = DEFAULT_BACKBONE,
        neck: str = DEFAULT_NECK,
    ) -> None:
        super().__init__()
        if neck not in NECKS:
            raise ValueError(f"neck must be one of {NECKS}, not {neck!r}")
        self.spec = get_backbone(backbone)
        self.backbone = self.spec.build()
        self.neck_kind = neck
        features = self.spec.features
        if neck == "identity":
            embedding_dim = features
            self.neck: nn.Module = nn.Dropout(dropout)
        elif neck == "svd_fc":
            self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, embedding_dim, bias=False))
        else:
            self.neck = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(features, embedding_dim, bias=False),
                nn.BatchNorm1d(embedding_dim),
            )
        self.embedding_dim = embedding_dim

    @property
    def architecture(self) -> str:
        return architecture_name(self.spec.name, self.neck_kind)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last block of the backbone: the layer Grad-CAM reads."""
        return self.spec.gradcam_layer(self.backbone)

    def set_svd_fc(self, classifier: Classifier) -> None:
        """Fill the ``svd_fc`` neck from the pretrained classifier (U V^T of its weights)."""
        layer: Any = list(self.neck.modules())[-1]
        weights = svd_fc(classifier)
        if self.neck_kind != "svd_fc" or layer.weight.shape != weights.shape:
            raise ValueError(
                f"the svd_fc neck needs embedding_dim {weights.shape[0]} (the classifier's classes)"
            )
        with torch.no_grad():
            layer.weight.copy_(weights)

    @property
    def fine_gradcam_layer(self) -> nn.Module:
        """A block at twice the last block's resolution (1/16 of the input), for the finer LayerCAM map."""
        return self.spec.fine_gradcam_layer(self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(images))


def stage_names(model: EmbeddingNet) -> list[str]:
    """The backbone's stages in order: what ``freeze_stages=N`` counts."""
    return [name for name, _ in model.spec.stages(model.backbone)]


def _stage_modules(model: EmbeddingNet, names: list[str]) -> list[nn.Module]:
    wanted = set(names)
    return [m for name, mods in model.spec.stages(model.backbone) if name in wanted for m in mods]


def freeze_stages(model: EmbeddingNet, count: int) -> list[str]:
    """Freeze the first ``count`` stages (parameters and BatchNorm statistics)."""
    names = stage_names(model)
    if not 0 <= count <= len(names):
        raise ValueError(
            f"freeze_stages must be between 0 and {len(names)} for {model.spec.name}, got {count}"
        )
    frozen = names[:count]
    for module in _stage_modules(model, frozen):
        module.requires_grad_(False)
    return frozen


def set_backbone_trainable(model: EmbeddingNet, trainable: bool, frozen: list[str]) -> None:
    """Switch the whole backbone off (head-only epochs) or back on, except stages kept ``frozen``."""
    model.backbone.requires_grad_(trainable)
    if trainable:
        for module in _stage_modules(model, frozen):
            module.requires_grad_(False)


def set_frozen_eval(model: EmbeddingNet, frozen: list[str]) -> None:
    """Keep frozen stages' BatchNorm layers in eval mode while the rest trains."""
    for module in _stage_modules(model, frozen):
        for sub in module.modules():
            if isinstance(sub, nn.BatchNorm2d):
                sub.eval()
