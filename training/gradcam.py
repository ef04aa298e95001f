"""Heat maps for embedding models: which regions make an image similar to a reference.

The target is the cosine similarity between the image's embedding and a reference embedding (for
example an enrolled photo of the matched individual). Three maps: gradient x input at the model's
input resolution (:func:`input_attribution_map`), the map the service and the reports show because
on the shipped EfficientNet-Lite2 dog model it is the one whose deletion curve falls faster than
random orders of pixels (:func:`deletion_curve`, docs/results.md); Grad-CAM on
``model.gradcam_layer`` (the last stage) and LayerCAM on ``model.fine_gradcam_layer`` (an earlier,
finer one), compared with it in the study. :func:`explanation_panel` draws a query and its
reference side by side.

The CAMs are a small hook-based implementation rather than ``pytorch_grad_cam.GradCAM`` / ``LayerCAM``
(grad-cam 1.5.7, which the tests use as the oracle), because the service runs it on a shared, live model:
GradCAM calls ``model.eval()`` and never restores the mode, back-propagates into every parameter's
``.grad`` (left behind on the served weights), fails with "element 0 of tensors does not require
grad" when the parameters do not require gradients (a frozen or inference-only model), records the
activations of *any* forward pass through the hooked layer (another request's, in another thread),
and pulls OpenCV, ttach and pyplot in at import time. Here the input requires the gradient, gradients are
taken with ``torch.autograd.grad`` of the target with respect to the layer's output only, the hook
records only this thread's pass, and the model's modes are restored.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from training.model import EmbeddingModel


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block; every module's own mode restored after it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _similarity(model: EmbeddingModel, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the embedding of a (1, 3, H, W) batch to ``reference`` (normalised here)."""
    ref = F.normalize(reference.detach().to(x.device, torch.float32).clone().flatten(), dim=0)
    return F.normalize(model(x), dim=1)[0] @ ref


def _input_copy(model: EmbeddingModel, image: torch.Tensor) -> torch.Tensor:
    """A (1, 3, H, W) float32 copy of a normalised (3, H, W) image on the model's device that
    requires the gradient. Call it outside inference mode: a tensor made under inference mode cannot
    join an autograd graph (hence the clone, of what may be an inference tensor)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a normalised (3, H, W) image, got {tuple(image.shape)}")
    device = next(model.parameters()).device
    return image.detach().to(device, torch.float32).clone().unsqueeze(0).requires_grad_(True)


def _activations_and_gradients(
    model: EmbeddingModel, image: torch.Tensor, reference: torch.Tensor, layer: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s (C, h, w) output for a normalised (3, H, W) image and the gradient of the cosine
    similarity to ``reference`` with respect to it."""
    owner = threading.get_ident()
    captured: list[torch.Tensor] = []

    def keep_output(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if threading.get_ident() == owner and output.requires_grad:
            captured.append(output)

    handle = layer.register_forward_hook(keep_output)
    try:
        with _evaluating(model), torch.inference_mode(False), torch.enable_grad():
            target = _similarity(model, _input_copy(model, image), reference)
            activations = captured[-1]
            (gradients,) = torch.autograd.grad(target, activations)
    finally:
        handle.remove()
    return activations.detach()[0], gradients[0]


def _to_map(cam: torch.Tensor, height: int, width: int) -> np.ndarray:
    cam = F.interpolate(cam[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-7)
    return cam.float().cpu().numpy()


def gradcam_map(
    model: EmbeddingModel, image: torch.Tensor, reference: torch.Tensor, layer: torch.nn.Module | None = None
) -> np.ndarray:
    """Grad-CAM heatmap (H, W) float32 in [0, 1] of a normalised (3, H, W) image.

    Target: cosine similarity of the image's embedding to ``reference`` (a (D,) embedding,
    normalised here too). ``layer`` is the module whose output is weighted, by default
    ``model.gradcam_layer``. Runs on the model's device; the model's train/eval modes and
    ``requires_grad`` flags are as before, and no parameter gradient is written. An all-zero map
    means no region raised the similarity.
    """
    activations, gradients = _activations_and_gradients(
        model, image, reference, model.gradcam_layer if layer is None else layer
    )
    weights = gradients.mean(dim=(1, 2))  # one weight per channel: the spatially pooled gradient
    cam = F.relu((weights[:, None, None] * activations).sum(dim=0))
    return _to_map(cam, *image.shape[1:])


def layercam_map(
    model: EmbeddingModel, image: torch.Tensor, reference: torch.Tensor, layer: torch.nn.Module | None = None
) -> np.ndarray:
    """LayerCAM heatmap (H, W) float32 in [0, 1]: the CAM with the finest detail.

    LayerCAM (Jiang et al., IEEE TIP 2021) weights each activation by its own positive gradient
    instead of a channel's spatial mean, which keeps earlier layers' detail; the layer is
    ``model.fine_gradcam_layer`` by default. Same target, device and safety as :func:`gradcam_map`.
    On the study's ResNet18 dog model its deletion curve fell fastest of the CAMs tried; on the
    shipped EfficientNet-Lite2 model it does not beat random orders (docs/results.md).
    """
    activations, gradients = _activations_and_gradients(
        model, image, reference, model.fine_gradcam_layer if layer is None else layer
    )
    cam = F.relu((F.relu(gradients) * activations).sum(dim=0))
    return _to_map(cam, *image.shape[1:])


def input_attribution_map(model: EmbeddingModel, image: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Gradient x input map (H, W) float32 in [0, 1]: the map the service and the reports show.

    Each pixel's share of the cosine similarity to ``reference`` to first order: the similarity's
    gradient with respect to the normalised (3, H, W) image times the image, summed over the colour
    channels. Hiding a pixel sets it to 0 (:func:`deletion_curve`), so this is the similarity a
    pixel's hiding removes, as far as the gradient sees: the map made for the deletion measure, at
    the model's full input resolution, for any architecture (fused models too). On the shipped
    EfficientNet-Lite2 dog model it is the only map tried whose deletion curve falls faster than
    random orders of pixels (docs/results.md). Positive shares only: 0 is "no part in raising the
    similarity". Same device and model safety as :func:`gradcam_map`; an all-zero map means no
    pixel raised the similarity.
    """
    with _evaluating(model), torch.inference_mode(False), torch.enable_grad():
        x = _input_copy(model, image)
        (gradients,) = torch.autograd.grad(_similarity(model, x, reference), x)
    share = F.relu((gradients * x.detach()).sum(dim=1)[0])
    return (share / (share.max() + 1e-12)).float().cpu().numpy()


def hottest_first(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices of ``heat`` from the hottest to the coldest; equal values in random order."""
    flat = np.asarray(heat, dtype=np.float64).ravel()
    shuffled = rng.permutation(flat.size)
    return shuffled[np.argsort(-flat[shuffled], kind="stable")]


@torch.no_grad()
def deletion_curve(
    model: EmbeddingModel, image: torch.Tensor, reference: torch.Tensor, order: np.ndarray, steps: int = 16
) -> np.ndarray:
    """Cosine similarity to ``reference`` as the pixels of a normalised (3, H, W) image are hidden.

    ``order`` lists flat pixel indices, the first hidden first; the curve has ``steps + 1`` points,
    from nothing hidden to everything hidden. A hidden pixel takes the value 0, the normalisation's
    mean (the grey the model sees as "no information"). A faithful heat map's order lowers the
    similarity faster than a random one: a smaller :func:`curve_area`.
    """
    height, width = image.shape[1:]
    if sorted(np.asarray(order).tolist()) != list(range(height * width)):
        raise ValueError(f"order must be a permutation of the {height * width} pixel indices")
    device = next(model.parameters()).device
    rank = torch.empty(height * width, dtype=torch.long)
    rank[torch.as_tensor(np.asarray(order), dtype=torch.long)] = torch.arange(height * width)
    hidden_counts = torch.linspace(0, height * width, steps + 1).round().long()
    keep = (rank[None, :] >= hidden_counts[:, None]).reshape(steps + 1, 1, height, width)
    x = image.detach().to(device, torch.float32)[None] * keep.to(device, torch.float32)
    with _evaluating(model):
        embeddings = F.normalize(model(x), dim=1)
    ref = F.normalize(reference.detach().to(device, torch.float32).flatten(), dim=0)
    return (embeddings @ ref).float().cpu().numpy()


def curve_area(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced points of [0, 1] (trapezoids)."""
    values = np.asarray(curve, dtype=np.float64)
    if values.size < 2:
        raise ValueError("a curve needs at least two points")
    return float(((values[1:] + values[:-1]) / 2.0).mean())


def deletion_areas(
    model: EmbeddingModel,
    image: torch.Tensor,
    reference: torch.Tensor,
    heat: np.ndarray,
    seed: int = 0,
    random_orders: int = 3,
    steps: int = 16,
) -> tuple[float, float]:
    """Areas under the deletion curve of a heat map's order (hottest first) and, as the baseline,
    the mean area of ``random_orders`` random orders: the first should be the smaller."""
    rng = np.random.default_rng(seed)
    hot = curve_area(deletion_curve(model, image, reference, hottest_first(heat, rng), steps))
    pixels = int(image.shape[1] * image.shape[2])
    random = [
        curve_area(deletion_curve(model, image, reference, rng.permutation(pixels), steps))
        for _ in range(random_orders)
    ]
    return hot, float(np.mean(random))


def _jet(values: np.ndarray) -> np.ndarray:
    """The classic jet colour map (blue -> cyan -> yellow -> red) of values in [0, 1], as uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The heatmap of ``cam`` blended over ``image`` (weight ``alpha`` on the heatmap), RGB, at the
    image's size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = image.convert("RGB")
    cam_image = Image.fromarray(np.asarray(cam, dtype=np.float32))
    resized = np.asarray(cam_image.resize(rgb.size, Image.Resampling.BILINEAR))
    heat = Image.fromarray(_jet(resized))
    return Image.blend(rgb, heat, alpha)


def _font(size: int = 14) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_size(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def colour_key(width: int, padding: int = 6) -> Image.Image:
    """The heat maps' colour scale as a labelled bar: what blue and red mean."""
    font = _font(12)
    bar_w = max(32, width - 2 * padding)
    bar = Image.fromarray(np.repeat(_jet(np.linspace(0.0, 1.0, bar_w))[None], 12, axis=0))
    labels = ("no part in the similarity", "raises the similarity most")
    text_h = max(_text_size(t, font)[1] for t in labels)
    key = Image.new("RGB", (bar_w + 2 * padding, 12 + text_h + 3 * padding), "white")
    key.paste(bar, (padding, padding))
    draw = ImageDraw.Draw(key)
    y = 12 + 2 * padding
    draw.text((padding, y), labels[0], fill="black", font=font)
    draw.text((padding + bar_w - _text_size(labels[1], font)[0], y), labels[1], fill="black", font=font)
    return key


def display_map(cam: np.ndarray, blur: float = 0.01, saturate: float = 99.5) -> np.ndarray:
    """A heat map as the pictures draw it: blurred by a Gaussian of ``blur`` times the map's longer
    side and divided by its ``saturate`` percentile, clipped to [0, 1].

    A pixel-level map (:func:`input_attribution_map`) is a speckle of single pixels whose few
    brightest would otherwise be the only colour on the picture; blurred and saturated, its hot
    pixels read as the regions they fall in. Drawing only: the maps the API returns and the
    deletion measure reads are the maps themselves. A smooth map (Grad-CAM) barely changes.
    """
    heat = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    sigma = blur * max(heat.shape)
    if sigma > 0.3:
        radius = max(1, round(3 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        padded = F.pad(heat[None, None], (radius, radius, radius, radius), mode="replicate")
        heat = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))[0, 0]
    top = float(np.percentile(heat.numpy(), saturate))
    return np.clip(heat.numpy() / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat.numpy())


def _fit_in(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled (up or down) so its longer side is ``side``."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def explanation_panel(
    query: tuple[Image.Image, np.ndarray],
    reference: tuple[Image.Image, np.ndarray],
    similarity: float,
    reference_label: str,
    tile: int = 256,
    padding: int = 8,
) -> Image.Image:
    """The query and the reference side by side, each photo with its heat map over it (drawn by
    :func:`display_map`), the similarity and the reference's individual written above, and the
    colour key below.

    ``query`` and ``reference`` are (photo, map) pairs; each map is what made that photo similar
    to the other one. Each photo is scaled so its longer side is ``tile`` pixels.
    """
    if tile < 32:
        raise ValueError(f"tile must be at least 32 pixels, got {tile}")
    title_font, caption_font = _font(16), _font(13)
    tiles = [_fit_in(overlay(photo, display_map(cam)), tile) for photo, cam in (query, reference)]
    captions = ["query", f"reference: {reference_label}"]
    title = f"similarity {similarity:.3f}"
    title_h = _text_size(title, title_font)[1]
    caption_h = max(_text_size(c, caption_font)[1] for c in captions)
    width = 2 * tile + 3 * padding
    key = colour_key(width - 2 * padding)
    height = title_h + caption_h + tile + key.height + 5 * padding
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    title_x = (width - _text_size(title, title_font)[0]) // 2
    draw.text((title_x, padding), title, fill="black", font=title_font)
    top = title_h + 2 * padding
    for i, (picture, caption) in enumerate(zip(tiles, captions, strict=True)):
        left = padding + i * (tile + padding)
        shown = caption
        while _text_size(shown, caption_font)[0] > tile and len(shown) > 4:
            shown = shown[:-2] + "…"
        draw.text((left, top), shown, fill="black", font=caption_font)
        y = top + caption_h + padding
        panel.paste(picture, (left + (tile - picture.width) // 2, y + (tile - picture.height) // 2))
    panel.paste(key, (padding, top + caption_h + tile + 2 * padding))
    return panel


def gradcam_grid(
    rows: list[tuple[str, list[Image.Image]]], column_titles: list[str], padding: int = 6
) -> Image.Image:
    """A labelled grid: one row per (label, images), one titled column per image position.

    Images are centred in cells as large as the largest image; a row may have fewer images than
    there are columns, never more.
    """
    if not rows:
        raise ValueError("a Grad-CAM grid needs at least one row")
    for label, images in rows:
        if len(images) > len(column_titles):
            raise ValueError(f"row {label!r} has {len(images)} images for {len(column_titles)} columns")
    font = ImageFont.load_default(size=14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return int(right - left), int(bottom - top)

    images = [img for _, row in rows for img in row]
    cell_w = max([img.width for img in images] + [text_size(t)[0] for t in column_titles] + [1])
    cell_h = max([img.height for img in images] + [1])
    label_w = max(text_size(label)[0] for label, _ in rows) + 2 * padding
    title_h = (
        max([text_size(t)[1] for t in column_titles] + [text_size(label)[1] for label, _ in rows])
        + 2 * padding
    )
    width = label_w + len(column_titles) * (cell_w + padding) + padding
    height = title_h + len(rows) * (cell_h + padding) + padding
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_titles):
        x = label_w + c * (cell_w + padding) + (cell_w - text_size(title)[0]) // 2
        draw.text((x, padding), title, fill="black", font=font)
    for r, (label, row) in enumerate(rows):
        y = title_h + r * (cell_h + padding)
        draw.text((padding, y + (cell_h - text_size(label)[1]) // 2), label, fill="black", font=font)
        for c, img in enumerate(row):
            x = label_w + c * (cell_w + padding)
            grid.paste(img.convert("RGB"), (x + (cell_w - img.width) // 2, y + (cell_h - img.height) // 2))
    return grid
