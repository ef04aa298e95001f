"""Grad-CAM for embedding models: which regions make an image similar to a reference.

The target is the cosine similarity between the image's embedding and a reference embedding (for
example an enrolled photo of the matched individual); the layer is ``model.gradcam_layer``.

This is a small hook-based implementation rather than ``pytorch_grad_cam.GradCAM`` (grad-cam
1.5.7, which the tests use as the oracle), because the service runs it on a shared, live model:
GradCAM calls ``model.eval()`` and never restores the mode, back-propagates into every parameter's
``.grad`` (left behind on the served weights), fails with "element 0 of tensors does not require
grad" when the parameters do not require gradients (a frozen or inference-only model), records the
activations of *any* forward pass through the hooked layer (another request's, in another thread),
and pulls OpenCV, ttach and pyplot in at import time. Here the input requires the gradient, gradients are
taken with ``torch.autograd.grad`` of the target with respect to the layer's output only, the hook
records only this thread's pass, and the model's modes are restored.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from training.model import EmbeddingNet


def gradcam_map(model: EmbeddingNet, image: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Grad-CAM heatmap (H, W) float32 in [0, 1] of a normalised (3, H, W) image.

    Target: cosine similarity of the image's embedding to ``reference`` (a (D,) embedding,
    normalised here too). Runs on the model's device; the model's train/eval modes and
    ``requires_grad`` flags are as before, and no parameter gradient is written. An all-zero map
    means no region raised the similarity.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a normalised (3, H, W) image, got {tuple(image.shape)}")
    device = next(model.parameters()).device
    height, width = image.shape[1:]
    owner = threading.get_ident()
    captured: list[torch.Tensor] = []

    def keep_output(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if threading.get_ident() == owner and output.requires_grad:
            captured.append(output)

    modes = [(module, module.training) for module in model.modules()]
    handle = model.gradcam_layer.register_forward_hook(keep_output)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            # clone(): a tensor made under inference mode cannot join an autograd graph.
            x = image.detach().to(device, torch.float32).clone().unsqueeze(0).requires_grad_(True)
            ref = F.normalize(reference.detach().to(device, torch.float32).clone().flatten(), dim=0)
            target = F.normalize(model(x), dim=1)[0] @ ref
            activations = captured[-1]
            (gradients,) = torch.autograd.grad(target, activations)
    finally:
        handle.remove()
        for module, training in modes:
            module.training = training
    weights = gradients[0].mean(dim=(1, 2))  # one weight per channel: the spatially pooled gradient
    cam = F.relu((weights[:, None, None] * activations.detach()[0]).sum(dim=0))
    cam = F.interpolate(cam[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-7)
    return cam.float().cpu().numpy()


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
