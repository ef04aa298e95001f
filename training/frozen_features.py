"""A metric learnt on frozen features: the backbone embeds every training photo once, and only the
neck and the margin head learn, on those features (``cache_features: true``).

With a frozen backbone, every epoch of ordinary training would run the whole network forward on
every photo to produce the same features again; computing them once makes an epoch cost the neck
and head alone, so a projection can train for many epochs on a CPU. The price is augmentation:
the features are fixed, so the only one kept is the mirror image (both views are embedded when
``hflip`` is on, and each step draws one of them per photo). The exported model is the whole
network, backbone included: one artifact, served like any other.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.model import EmbeddingNet
from training.preprocess import PreprocessSpec, normalize


@torch.no_grad()
def backbone_features(
    model: EmbeddingNet,
    pixels: torch.Tensor,
    spec: PreprocessSpec,
    device: torch.device,
    mirror: bool,
    batch_size: int = 128,
) -> torch.Tensor:
    """Pooled backbone features (N, V, F) on the CPU of uint8 pixels (N, 3, H, W): V = 2 views (the
    photo and its mirror image) when ``mirror``, else 1. The backbone runs in eval mode."""
    was_training = model.backbone.training
    model.backbone.eval()
    chunks = []
    for start in range(0, len(pixels), batch_size):
        batch = normalize(pixels[start : start + batch_size].to(device), spec)
        views = [batch, batch.flip(-1)] if mirror else [batch]
        chunks.append(torch.stack([model.backbone(v).float().cpu() for v in views], 1))
    model.backbone.train(was_training)
    if not chunks:
        return torch.empty((0, 2 if mirror else 1, model.spec.features))
    return torch.cat(chunks)


def draw_views(features: torch.Tensor, rows: list[int], generator: torch.Generator) -> torch.Tensor:
    """One view per photo of ``rows`` from (N, V, F) features, drawn at random (the mirror augmentation)."""
    views = torch.randint(features.shape[1], (len(rows),), generator=generator)
    return features[torch.tensor(rows, dtype=torch.int64), views]


@torch.no_grad()
def neck_embeddings(model: EmbeddingNet, features: torch.Tensor, device: torch.device) -> np.ndarray:
    """L2-normalised embeddings (N, D) of backbone features (N, F): the neck alone, in eval mode."""
    was_training = model.neck.training
    model.neck.eval()
    emb = F.normalize(model.neck(features.to(device)), dim=1).float().cpu().numpy()
    model.neck.train(was_training)
    return emb
