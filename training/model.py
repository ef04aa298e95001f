"""The embedding network: torchvision ResNet18 (no downloaded weights) and a 512-D neck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

ARCHITECTURE = "resnet18-gap-linear-bn"


class EmbeddingNet(nn.Module):
    """ResNet18 trunk, global average pooling, then Linear + BatchNorm to ``embedding_dim``.

    ``forward`` returns raw embeddings (what margin heads train on); ``embed`` returns the
    L2-normalised embeddings used for search.
    """

    def __init__(self, embedding_dim: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        backbone = resnet18(weights=None)
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.neck = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(512, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )
        self.embedding_dim = embedding_dim

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last residual block: the layer Grad-CAM reads."""
        return self.backbone.layer4[-1]

    @property
    def fine_gradcam_layer(self) -> nn.Module:
        """The third residual stage: twice the last stage's resolution, for the finer LayerCAM map."""
        return self.backbone.layer3[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward(images), dim=1)


# ResNet stages that ``freeze_stages=N`` freezes, in order.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def stage_modules(model: EmbeddingNet, name: str) -> list[nn.Module]:
    b = model.backbone
    if name == "stem":
        return [b.conv1, b.bn1]
    return [getattr(b, name)]


def freeze_stages(model: EmbeddingNet, count: int) -> list[str]:
    """Freeze the first ``count`` stages (parameters and BatchNorm statistics)."""
    if not 0 <= count <= len(STAGES):
        raise ValueError(f"freeze_stages must be between 0 and {len(STAGES)}, got {count}")
    frozen = list(STAGES[:count])
    for name in frozen:
        for module in stage_modules(model, name):
            module.requires_grad_(False)
    return frozen


def set_frozen_eval(model: EmbeddingNet, frozen: list[str]) -> None:
    """Keep frozen stages' BatchNorm layers in eval mode while the rest trains."""
    for name in frozen:
        for module in stage_modules(model, name):
            for sub in module.modules():
                if isinstance(sub, nn.BatchNorm2d):
                    sub.eval()
