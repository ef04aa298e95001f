"""training.gradcam: Grad-CAM and LayerCAM of cosine similarity, checked against pytorch-grad-cam as
the oracle; gradient x input against plain autograd; deletion curves; the explanation picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.gradcam import (
    _jet,
    colour_key,
    curve_area,
    deletion_areas,
    deletion_curve,
    display_map,
    explanation_panel,
    gradcam_grid,
    gradcam_map,
    hottest_first,
    input_attribution_map,
    layercam_map,
    overlay,
)
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


@pytest.mark.parametrize(
    ("oracle_name", "layer_name", "ours"),
    [("GradCAM", "gradcam_layer", gradcam_map), ("LayerCAM", "fine_gradcam_layer", layercam_map)],
    ids=["gradcam", "layercam"],
)
def test_map_matches_pytorch_grad_cam(tiny_model, oracle_name, layer_name, ours):
    import pytorch_grad_cam

    model = EmbeddingNet(embedding_dim=32)
    model.load_state_dict(tiny_model.state_dict())
    image, reference = _inputs(size=(64, 96))
    with getattr(pytorch_grad_cam, oracle_name)(model, [getattr(model, layer_name)]) as oracle:
        expected = oracle(image[None], [lambda out: F.cosine_similarity(out, reference, dim=0)])[0]
    np.testing.assert_allclose(ours(tiny_model, image, reference), expected, atol=1e-4)


def test_input_attribution_is_each_pixels_positive_gradient_times_input(tiny_model):
    image, reference = _inputs(size=(64, 96))
    x = image.clone()[None].requires_grad_(True)
    similarity = F.normalize(tiny_model.eval()(x), dim=1)[0] @ reference
    (gradient,) = torch.autograd.grad(similarity, x)
    share = (gradient * image).sum(dim=1)[0].clamp(min=0)
    cam = input_attribution_map(tiny_model, image, reference)
    assert cam.shape == (64, 96) and cam.dtype == np.float32 and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cam, (share / share.max()).numpy(), atol=1e-5)
    # Pixel level: far more distinct values than the CAMs' few cells.
    assert len(np.unique(cam)) > 1000


def test_the_fine_layer_maps_at_a_finer_grid(tiny_model):
    """At 64 x 64 the last stage is 2 x 2 cells and the fine one 4 x 4: more distinct values."""
    seen = {}
    for name, layer in (("coarse", tiny_model.gradcam_layer), ("fine", tiny_model.fine_gradcam_layer)):
        captured = []
        handle = layer.register_forward_hook(lambda _m, _i, out, captured=captured: captured.append(out))
        with torch.no_grad():
            tiny_model.eval()(torch.zeros(1, 3, 64, 64))
        handle.remove()
        seen[name] = captured[0].shape[-2:]
    assert seen == {"coarse": (2, 2), "fine": (4, 4)}


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
    for heat_map in (gradcam_map, layercam_map, input_attribution_map):
        assert heat_map(model, image, reference).shape == (64, 64)
    deletion_curve(model, image, reference, np.arange(64 * 64), steps=2)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


MAPS = pytest.mark.parametrize(
    "heat_map", [gradcam_map, layercam_map, input_attribution_map], ids=["gradcam", "layercam", "input"]
)


@MAPS
def test_works_without_parameter_gradients_and_inside_inference_mode(tiny_model, heat_map):
    model = EmbeddingNet(embedding_dim=32)
    model.load_state_dict(tiny_model.state_dict())
    model.eval().requires_grad_(False)  # how an inference-only service might hold it
    image, reference = _inputs()
    expected = heat_map(tiny_model, image, reference)
    with torch.inference_mode():
        frozen_image = image.clone()  # an inference tensor
        cam = heat_map(model, frozen_image, reference)
    np.testing.assert_allclose(cam, expected, atol=1e-6)


@MAPS
def test_rejects_a_batch(tiny_model, heat_map):
    image, reference = _inputs()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        heat_map(tiny_model, image[None], reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@MAPS
def test_runs_on_the_model_device(tiny_model, heat_map, ieee_fp32):
    model = EmbeddingNet(embedding_dim=32)
    model.load_state_dict(tiny_model.state_dict())
    model.eval().cuda()
    image, reference = _inputs()
    cam = heat_map(model, image.cuda(), reference.cuda())
    np.testing.assert_allclose(cam, heat_map(tiny_model, image, reference), atol=1e-3)
    order = np.random.default_rng(0).permutation(64 * 64)
    np.testing.assert_allclose(
        deletion_curve(model, image.cuda(), reference.cuda(), order, steps=4),
        deletion_curve(tiny_model, image, reference, order, steps=4),
        atol=1e-3,
    )


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


def test_hottest_first_orders_by_heat_and_shuffles_ties():
    heat = np.array([[0.2, 0.9], [0.0, 0.2]])
    orders = {tuple(hottest_first(heat, np.random.default_rng(seed))) for seed in range(20)}
    assert orders == {(1, 0, 3, 2), (1, 3, 0, 2)}  # the two 0.2 pixels in either order


def test_deletion_curve_runs_from_the_photo_to_grey(tiny_model):
    image, _ = _inputs()
    with torch.no_grad():
        tiny_model.eval()
        embeddings = F.normalize(tiny_model(torch.stack([image, torch.zeros_like(image)])), dim=1)
    reference = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0)
    order = np.random.default_rng(0).permutation(64 * 64)
    curve = deletion_curve(tiny_model, image, reference, order, steps=4)
    assert curve.shape == (5,)
    assert curve[0] == pytest.approx(float(embeddings[0] @ reference), abs=1e-5)  # nothing hidden
    assert curve[-1] == pytest.approx(float(embeddings[1] @ reference), abs=1e-5)  # all grey
    # Hiding the first quarter of the order is the image with those pixels set to 0.
    half = image.clone().reshape(3, -1)
    half[:, torch.as_tensor(order[: 64 * 64 // 4])] = 0.0
    with torch.no_grad():
        expected = F.normalize(tiny_model(half.reshape(1, 3, 64, 64)), dim=1)[0] @ reference
    assert curve[1] == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        deletion_curve(tiny_model, image, reference, np.zeros(64 * 64, dtype=int))


def test_curve_area_by_hand():
    assert curve_area(np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert curve_area(np.array([1.0, 1.0, 0.0])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        curve_area(np.array([1.0]))


def test_deletion_areas_are_the_map_order_and_random_orders_of_one_seeded_generator(tiny_model):
    image, reference = _inputs(seed=3)
    heat = layercam_map(tiny_model, image, reference)
    hot, random = deletion_areas(tiny_model, image, reference, heat, seed=7, random_orders=2, steps=4)
    rng = np.random.default_rng(7)
    expected_hot = curve_area(deletion_curve(tiny_model, image, reference, hottest_first(heat, rng), 4))
    shuffled = [deletion_curve(tiny_model, image, reference, rng.permutation(64 * 64), 4) for _ in range(2)]
    assert hot == pytest.approx(expected_hot)
    assert random == pytest.approx(np.mean([curve_area(c) for c in shuffled]))


def _colour_present(picture: Image.Image, rgb: tuple[int, int, int]) -> bool:
    return bool(np.all(np.asarray(picture).reshape(-1, 3) == rgb, axis=1).any())


def test_display_map_blurs_single_pixels_into_regions_and_saturates_the_top():
    cam = np.zeros((100, 60), dtype=np.float32)
    cam[50, 30] = 1.0  # one hot pixel: blurred by a Gaussian of 1 pixel (1% of 100)
    shown = display_map(cam, saturate=100.0)
    assert shown.shape == cam.shape and shown.min() >= 0.0 and shown.max() <= 1.0
    assert shown[50, 30] == 1.0 and shown[50, 31] == pytest.approx(np.exp(-0.5), abs=0.01)
    assert shown[50, 40] == 0.0
    ramp = np.tile(np.linspace(0.0, 1.0, 200, dtype=np.float32), (200, 1))
    shown = display_map(ramp, blur=0.0)
    assert (shown == 1.0).mean() == pytest.approx(0.005, abs=0.003)  # the top 0.5 % saturate
    np.testing.assert_array_equal(display_map(np.zeros((8, 8), dtype=np.float32)), 0.0)


def test_colour_key_spans_the_map_colours():
    key = colour_key(300)
    assert key.width == 300
    low, high = (tuple(int(v) for v in _jet(np.array([x]))[0]) for x in (0.0, 1.0))
    assert _colour_present(key, low) and _colour_present(key, high)
    assert np.asarray(key).min() == 0  # the labels, in black


def test_explanation_panel_shows_both_photos_with_their_maps_and_a_key():
    query = Image.new("RGB", (80, 40), (0, 0, 0))
    reference = Image.new("RGB", (30, 60), (0, 0, 0))
    hot, cold = np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32)
    panel = explanation_panel((query, hot), (reference, cold), 0.8123, "rex, image 3f2a9d81", tile=100)
    pixels = np.asarray(panel)
    # Left tile: the query (2:1) under a fully hot map, 100 x 50; right: the reference under a cold one.
    dark_red = tuple(int(v) // 2 for v in _jet(np.array([1.0]))[0])
    dark_blue = tuple(int(v) // 2 for v in _jet(np.array([0.0]))[0])
    left, right = pixels[:, : panel.width // 2], pixels[:, panel.width // 2 :]
    assert int(np.all(left == dark_red, axis=2).sum()) == 100 * 50
    assert int(np.all(right == dark_blue, axis=2).sum()) == 50 * 100
    low, high = (tuple(int(v) for v in _jet(np.array([x]))[0]) for x in (0.0, 1.0))
    assert _colour_present(panel, low) and _colour_present(panel, high)  # the colour key
    assert pixels[:20].min() == 0  # the title (the similarity) is written above
    with pytest.raises(ValueError, match="tile"):
        explanation_panel((query, hot), (reference, cold), 0.5, "x", tile=8)
