"""training.gradcam: Grad-CAM of cosine similarity, checked against pytorch-grad-cam as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.gradcam import gradcam_grid, gradcam_map, overlay
from training.model import EmbeddingNet, freeze_stages


def _inputs(seed: int = 0, size: tuple[int, int] = (64, 64)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, *size, generator=g)
    reference = F.normalize(torch.randn(32, generator=g), dim=0)
    return image, reference


def test_map_has_the_input_size_and_range(tiny_model):
    image, reference = _inputs(size=(64, 96))
    cam = gradcam_map(tiny_model, image, reference)
    assert cam.shape == (64, 96) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0 and cam.max() > 0.99


def test_map_follows_the_reference(tiny_model):
    image, reference = _inputs()
    cam = gradcam_map(tiny_model, image, reference)
    # The opposite reference flips every channel weight: what raised similarity now lowers it.
    assert np.abs(cam - gradcam_map(tiny_model, image, -reference)).max() > 0.3
    _, other = _inputs(seed=1)
    assert np.abs(cam - gradcam_map(tiny_model, image, other)).max() > 0.05
    np.testing.assert_array_equal(cam, gradcam_map(tiny_model, image, reference))  # deterministic


def test_map_matches_pytorch_grad_cam(tiny_model):
    from pytorch_grad_cam import GradCAM

    model = EmbeddingNet(embedding_dim=32)
    model.load_state_dict(tiny_model.state_dict())
    image, reference = _inputs(size=(64, 96))
    with GradCAM(model, [model.gradcam_layer]) as oracle:
        expected = oracle(image[None], [lambda out: F.cosine_similarity(out, reference, dim=0)])[0]
    np.testing.assert_allclose(gradcam_map(tiny_model, image, reference), expected, atol=1e-4)


def test_model_state_is_left_as_it_was():
    torch.manual_seed(1)
    model = EmbeddingNet(embedding_dim=32)
    frozen = freeze_stages(model, 2)
    model.train()
    model.backbone.bn1.eval()  # a frozen stage's BatchNorm kept in eval while the rest trains
    assert frozen == ["stem", "layer1"]
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    image, reference = _inputs()
    cam = gradcam_map(model, image, reference)
    assert cam.shape == (64, 64)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_works_without_parameter_gradients_and_inside_inference_mode(tiny_model):
    model = EmbeddingNet(embedding_dim=32)
    model.load_state_dict(tiny_model.state_dict())
    model.eval().requires_grad_(False)  # how an inference-only service might hold it
    image, reference = _inputs()
    expected = gradcam_map(tiny_model, image, reference)
    with torch.inference_mode():
        frozen_image = image.clone()  # an inference tensor
        cam = gradcam_map(model, frozen_image, reference)
    np.testing.assert_allclose(cam, expected, atol=1e-6)


def test_rejects_a_batch(tiny_model):
    image, reference = _inputs()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        gradcam_map(tiny_model, image[None], reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_model_device(tiny_model):
    model = EmbeddingNet(embedding_dim=32)
    model.load_state_dict(tiny_model.state_dict())
    model.eval().cuda()
    image, reference = _inputs()
    cam = gradcam_map(model, image.cuda(), reference.cuda())
    np.testing.assert_allclose(cam, gradcam_map(tiny_model, image, reference), atol=1e-3)


def test_overlay_blends_a_jet_heatmap_at_the_image_size():
    image = Image.new("L", (40, 30), 0)  # greyscale in, RGB out
    hot = overlay(image, np.ones((8, 8), np.float32), alpha=1.0)
    assert hot.mode == "RGB" and hot.size == (40, 30)
    # jet(1): red = 1.5 - |4 * (1 - .75)| = .5 -> 128; green and blue clip to 0.
    assert np.all(np.asarray(hot) == (128, 0, 0))
    # jet(0) is dark blue (0, 0, 128); half-and-half over black halves it: 64.
    assert np.all(np.asarray(overlay(image, np.zeros((8, 8), np.float32), alpha=0.5)) == (0, 0, 64))
    grey = Image.new("RGB", (40, 30), (90, 90, 90))
    assert overlay(grey, np.ones((8, 8), np.float32), alpha=0.0).tobytes() == grey.tobytes()
    with pytest.raises(ValueError):
        overlay(grey, np.ones((8, 8), np.float32), alpha=1.5)


def test_grid_places_every_image_under_its_title():
    green = Image.new("RGB", (20, 20), (0, 255, 0))
    rows = [("model A", [green, green]), ("model B", [green])]
    grid = gradcam_grid(rows, ["query", "reference"])
    pixels = np.asarray(grid).reshape(-1, 3)
    assert int(np.all(pixels == (0, 255, 0), axis=1).sum()) == 3 * 20 * 20
    assert grid.width >= 2 * 20 and grid.height >= 2 * 20
    assert np.asarray(grid)[:, :, 0].min() == 0  # some text was drawn in black
    with pytest.raises(ValueError, match="columns"):
        gradcam_grid([("too many", [green] * 3)], ["query", "reference"])
