"""A loaded species model: images in, L2-normalised embeddings out, with the training preprocessing.

Every image goes through :func:`training.preprocess.preprocess` with the spec stored in the model
card, so serving sees exactly the pixels the offline evaluation saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from service.errors import ConfigurationError
from training.artifact import LoadedModel, ModelCard
from training.gradcam import input_attribution_map
from training.model import EmbeddingModel
from training.preprocess import preprocess


def resolve_device(setting: str) -> torch.device:
    """``auto`` picks CUDA when torch sees it, else the CPU; ``cuda`` without a GPU is an error."""
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError("ANIMALID_DEVICE=cuda but torch sees no CUDA device")
        return torch.device("cuda")
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    raise ConfigurationError(f"unknown device setting {setting!r} (auto, cpu or cuda)")


class Embedder:
    def __init__(self, loaded: LoadedModel, device: torch.device) -> None:
        self.loaded = loaded
        self.device = device
        # Channels-last: measured 8% more images per second at batch 1 and 35% at batch 2 for the
        # EfficientNet-Lite demo model on the 2-core CPU (docs/benchmarks.md, dynamic batching).
        model = loaded.model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model: EmbeddingModel = model.eval()

    @property
    def card(self) -> ModelCard:
        return self.loaded.card

    @property
    def model_version(self) -> str:
        return self.card.model_version

    @property
    def dim(self) -> int:
        return int(self.card.embedding_dim)

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised (N, 3, H, W) float32 on the model's device."""
        spec = self.card.preprocess
        return torch.stack([preprocess(image, spec) for image in images]).to(self.device)

    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model.embed(batch.contiguous(memory_format=torch.channels_last))
        return out.float().cpu().numpy().astype(np.float32, copy=False)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float32, rows of unit length; one forward pass for the whole batch."""
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_tensor(self.batch(images))

    def warmup(self) -> None:
        height, width = self.card.preprocess.input_size
        self.embed_tensor(torch.zeros((1, 3, height, width), device=self.device))

    def heat_map(self, image: Image.Image, reference: np.ndarray) -> np.ndarray:
        """Heat map (H, W) in [0, 1] at the model's input size of what in ``image`` raises its
        similarity to ``reference``: gradient x input, the map whose deletion curve falls faster
        than random orders on the shipped dog model (training.gradcam, docs/results.md).

        ``input_attribution_map`` is safe on the shared, serving model: it writes no parameter
        gradient and restores the modules' modes.
        """
        tensor = preprocess(image, self.card.preprocess).to(self.device)
        ref = torch.tensor(np.asarray(reference, dtype=np.float32), device=self.device)
        return np.asarray(input_attribution_map(self.model, tensor, ref), dtype=np.float32)
