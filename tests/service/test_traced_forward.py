"""The served forward pass is traced to one TorchScript graph (it runs without Python's global lock)
and gives the eager model's embeddings; a model the tracer cannot follow is served eagerly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from apps import ADMIN, TestClient
from imagegen import jpeg
from torch import nn

from service.app import create_app
from service.ml.embedder import Embedder, traced_embed
from service.ml.images import ImagePolicy, decode_image
from service.settings import Settings
from training.artifact import load_artifact
from training.model import EmbeddingModel

LOOSE = ImagePolicy(max_pixels=10**8, max_request_pixels=10**8)


@pytest.mark.parametrize(
    ("kind", "device"),
    [
        ("dog", "cpu"),
        ("cat", "cpu"),
        ("dog_lite", "cpu"),
        pytest.param("dog", "cuda", marks=pytest.mark.cuda),
    ],
)
def test_the_traced_pass_gives_the_eager_embeddings_at_every_batch_size(
    kind: str, device: str, artifacts: dict[str, Path], ieee_fp32: None
) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    embedder = Embedder(load_artifact(artifacts[kind], device), torch.device(device))
    images = [decode_image(jpeg(700 + i, i % 3), LOOSE).image for i in range(8)]
    eager = embedder.embed(images)
    embedder.warmup()
    assert embedder.traced
    for size in (1, 3, 8):  # traced with a batch of 2
        np.testing.assert_allclose(embedder.embed(images[:size]), eager[:size], atol=1e-4)
    # the heat map still runs on the eager model, with gradients
    assert embedder.heat_map(images[0], eager[1]).shape == embedder.card.preprocess.input_size


class _Toy(EmbeddingModel):
    """A linear embedding of the mean colour, with a twist given by ``kind``."""

    embedding_dim = 3

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(3, 3)

    @property
    def architecture(self) -> str:
        return f"toy-{self.kind}"

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.linear

    @property
    def fine_gradcam_layer(self) -> nn.Module:
        return self.linear

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.linear(images.mean(dim=(2, 3)))
        if self.kind == "branch" and images.shape[0] > 1:  # the tracer keeps the example's branch
            return out + 1.0
        if self.kind == "numpy":  # leaves torch: nothing to trace
            return torch.from_numpy(out.detach().numpy() + 1.0)
        return out


@pytest.mark.parametrize(("kind", "traced"), [("plain", True), ("branch", False), ("numpy", False)])
def test_a_model_the_tracer_cannot_follow_is_not_traced(kind: str, traced: bool) -> None:
    torch.manual_seed(0)
    model = _Toy(kind).eval()
    graph = traced_embed(model, torch.rand(2, 3, 8, 8))
    assert (graph is not None) is traced
    if graph is not None:
        batch = torch.rand(5, 3, 8, 8)
        torch.testing.assert_close(graph(batch), model.embed(batch))


@pytest.mark.parametrize("trace", [True, False])
def test_the_service_serves_the_traced_pass_unless_told_not_to(trace: bool, settings: Settings) -> None:
    assert Settings.model_fields["trace_forward"].default is True
    with TestClient(
        create_app(settings.model_copy(update={"trace_forward": trace})), headers=ADMIN
    ) as client:
        embedder = client.app.state.runtime.registry.serving("dog").embedder  # type: ignore[attr-defined]
        assert embedder.traced is trace
        enrolled = client.post(
            "/enroll", data={"species": "dog", "external_id": "rex"}, files={"images": ("a.jpg", jpeg(1, 0))}
        )
        assert enrolled.status_code == 201, enrolled.text
        found = client.post("/identify", data={"species": "dog"}, files={"image": ("a.jpg", jpeg(1, 0))})
        assert found.json()["candidates"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
