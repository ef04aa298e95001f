"""Margin heads (ArcFace, CosFace) and the batch-hard triplet loss.

Units: ``margin`` is in radians for ArcFace (additive angular margin) and in cosine units for
CosFace. pytorch-metric-learning's ``ArcFaceLoss`` takes its margin in *degrees*; the tests check
this head against it with the conversion spelled out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _NormalisedLinear(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))


class ArcFaceHead(_NormalisedLinear):
    """Additive angular margin: the target logit is ``scale * cos(theta + margin)``.

    Near ``theta = pi - margin`` the angle would wrap past pi, where cos(theta + m) stops being
    monotonic; there the target logit falls back to ``cos(theta) - margin * sin(margin)``
    (the insightface convention), and no ``acos`` is evaluated, so gradients stay finite at
    ``theta = 0`` and ``theta = pi``.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5
    ) -> None:
        super().__init__(embedding_dim, num_classes)
        self.scale = scale
        self.set_margin(margin)

    def set_margin(self, margin: float) -> None:
        """Change the margin (margin warm-up does, once per epoch)."""
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError("ArcFace margin is in radians and must be in [0, pi/2)")
        self.margin = margin
        self._cos_m = math.cos(margin)
        self._sin_m = math.sin(margin)
        self._threshold = math.cos(math.pi - margin)
        self._fallback = math.sin(math.pi - margin) * margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings).clamp(-1.0, 1.0)
        target = cos.gather(1, labels.view(-1, 1))
        sin = torch.sqrt((1.0 - target * target).clamp_min(1e-12))
        with_margin = target * self._cos_m - sin * self._sin_m
        with_margin = torch.where(target > self._threshold, with_margin, target - self._fallback)
        logits = cos.scatter(1, labels.view(-1, 1), with_margin)
        return logits * self.scale


class CosFaceHead(_NormalisedLinear):
    """Large margin cosine loss: the target logit is ``scale * (cos(theta) - margin)``."""

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.35
    ) -> None:
        super().__init__(embedding_dim, num_classes)
        self.scale = scale
        self.set_margin(margin)

    def set_margin(self, margin: float) -> None:
        """Change the margin (margin warm-up does, once per epoch)."""
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        one_hot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return (cos - self.margin * one_hot) * self.scale


class MarginLoss(nn.Module):
    """Cross-entropy over a margin head's logits."""

    def __init__(self, head: ArcFaceHead | CosFaceHead) -> None:
        super().__init__()
        self.head: ArcFaceHead | CosFaceHead = head

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(embeddings, labels), labels)


class BatchHardTripletLoss(nn.Module):
    """FaceNet-style triplet loss with batch-hard mining (hardest positive and negative per anchor).

    Wraps pytorch-metric-learning (cosine distance on L2-normalised embeddings, so ``margin`` is in
    cosine-similarity units). Needs batches holding several images of each individual.
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        from pytorch_metric_learning import distances, losses, miners

        distance = distances.CosineSimilarity()
        self.miner = miners.BatchHardMiner(distance=distance)
        self.loss = losses.TripletMarginLoss(margin=margin, distance=distance)
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = embeddings.float()
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


LOSSES = ("arcface", "cosface", "triplet")


def build_loss(name: str, embedding_dim: int, num_classes: int, scale: float, margin: float) -> nn.Module:
    """The training criterion for one species: ``loss(embeddings, labels) -> scalar``."""
    if name == "arcface":
        return MarginLoss(ArcFaceHead(embedding_dim, num_classes, scale=scale, margin=margin))
    if name == "cosface":
        return MarginLoss(CosFaceHead(embedding_dim, num_classes, scale=scale, margin=margin))
    if name == "triplet":
        return BatchHardTripletLoss(margin=margin)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
