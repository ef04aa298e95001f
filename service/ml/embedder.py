"""A loaded species model: images in, L2-normalised embeddings out, with the training preprocessing.

Every image goes through :func:`training.preprocess.preprocess` with the spec stored in the model
card, so serving sees exactly the pixels the offline evaluation saw.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from service.errors import ConfigurationError
from training.artifact import LoadedModel, ModelCard
from training.gradcam import input_attribution_map
from training.model import EmbeddingModel
from training.preprocess import preprocess

log = logging.getLogger(__name__)

TRACE_TOLERANCE = 2e-3
"""Largest difference of any embedding coordinate between the traced and the eager pass (unit
vectors): more, and the model is served by its eager pass. Above the 1e-3 by which TF32 convolutions
on a GPU make two passes differ (tests/conftest.py), far below what a trace that took a wrong branch
gives."""


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
        self._embed: Callable[[torch.Tensor], torch.Tensor] = self.model.embed
        self.traced = False
        # Images per second of a batch over a batch of one (warmup(batch); None: not measured).
        self.batch_speedup: float | None = None

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
            out = self._embed(batch.contiguous(memory_format=torch.channels_last))
        return out.float().cpu().numpy().astype(np.float32, copy=False)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float32, rows of unit length; one forward pass for the whole batch."""
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_tensor(self.batch(images))

    def warmup(self, batch: int = 1, trace: bool = True) -> None:
        """Trace the forward pass when ``trace`` (:func:`traced_embed`; the eager one serves when that
        fails) and run it once; with ``batch`` above 1, also measure :attr:`batch_speedup` at that size."""
        height, width = self.card.preprocess.input_size
        example = torch.rand((2, 3, height, width), device=self.device)
        if trace:
            traced = traced_embed(self.model, example.contiguous(memory_format=torch.channels_last))
            if traced is None:
                log.warning("%s: serving the eager forward pass (it could not be traced)", self.model_version)
            else:
                self._embed, self.traced = traced, True
        self.embed_tensor(example[:1])
        if batch > 1:
            self.batch_speedup = self._images_per_second(batch) / self._images_per_second(1)

    def _images_per_second(self, size: int, passes: int = 2) -> float:
        """At batch ``size``: the fastest of ``passes`` timed passes, after an untimed one."""
        height, width = self.card.preprocess.input_size
        batch = torch.rand((size, 3, height, width), device=self.device)
        self.embed_tensor(batch)
        fastest = math.inf
        for _ in range(passes):
            start = time.perf_counter()
            self.embed_tensor(batch)  # ends on the CPU: a GPU's work is done
            fastest = min(fastest, time.perf_counter() - start)
        return size / max(fastest, 1e-9)

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


class _Embed(nn.Module):
    """``model.embed`` as a module's forward, for tracing."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def traced_embed(
    model: EmbeddingModel, example: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``model.embed`` as one TorchScript graph, or None when it cannot be traced or its
    embeddings differ from the eager pass's (by more than :data:`TRACE_TOLERANCE`, at the example's
    batch size and at one).

    Why: the graph runs without Python's global interpreter lock. The eager pass takes the lock back
    after every layer, and while request threads hold it (HTTP, decoding, search) it waits out the
    interpreter's switch interval each time: on the 2-core CPU a ResNet18 batch of 8 took 39 ms
    alone and 418 ms beside one busy Python thread, against 48 ms traced
    (docs/benchmarks.md, dynamic batching). The eager model still serves the heat maps, which
    need gradients.
    """
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch 2.14 marks tracing deprecated in favour of torch.compile, which compiles with a
            # C++ toolchain at start-up; tracing needs none and is still supported. The tracer's
            # warnings are of shapes it takes as constants: the input size is (preprocessing fixes it).
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # check_trace would trace twice to compare; the check below compares with the eager pass.
            # Not frozen: torch.jit.freeze folds the weights into the graph as constants that the
            # process then keeps for good (50 MB a ResNet18, at every start and model switch).
            graph = torch.jit.trace(_Embed(model).eval(), example, check_trace=False)
        with torch.inference_mode():
            for batch in (example, example[:1]):
                if float((graph(batch) - model.embed(batch)).abs().max()) > TRACE_TOLERANCE:
                    return None
    except Exception:  # noqa: BLE001 - any model the tracer cannot follow is served eagerly
        log.debug("tracing failed", exc_info=True)
        return None
    return graph
