"""Training-time augmentation of uint8 pixel batches, seeded by one ``torch.Generator``.

Applied on top of the cached, already resized pixels (the evaluation transform's output), so the
model trains on the pixels serving will give it plus random changes. Every random draw comes from
``generator``, so a resumed run and every process of a distributed one draw the same changes.
Order: rotation and zoom, shift and brightness/contrast jitter, random erasing, horizontal flip.

The draws are made on the CPU (``generator`` is a CPU generator) and the pixels are changed where
they are: a batch copied to a GPU as uint8 is augmented there, queued behind the step before it, so
the CPU's share is drawing, gathering and copying. The draws are the same on either device, so on
the CPU the result is what it was before augmentation moved, draw for draw.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.preprocess import on_device

# Random erasing blanks a rectangle of this share of the image area (at most a quarter; torchvision's
# RandomErasing goes to a third), of aspect ratio (h/w) between ERASE_ASPECT and its inverse (as
# torchvision's 0.3 to 3.3).
ERASE_AREA = (0.02, 0.25)
ERASE_ASPECT = 0.3


def augment(pixels: torch.Tensor, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """Randomly changed copies of uint8 pixels (N, 3, H, W), as ``config`` asks."""
    n = pixels.shape[0]
    out = pixels.float()
    if config.rotate_degrees or config.zoom:
        angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(config.rotate_degrees)
        scales = 1 + (torch.rand(n, generator=generator) * 2 - 1) * config.zoom
        out = rotate_and_zoom(out, angles, scales)
    if config.augment:
        out = shift_and_jitter(out, generator)
    if config.erase_probability:
        out = random_erasing(out, generator, config.erase_probability)
    if config.hflip:
        flip = on_device(torch.rand(n, generator=generator) < 0.5, out.device)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return out.round().clamp(0, 255).to(torch.uint8)


def rotate_and_zoom(images: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rotate each float image (N, C, H, W) about its centre by ``angles`` (radians, counter-clockwise
    as displayed) and magnify it by ``scales`` (> 1 zooms in), filling the borders by reflection.

    The rotation is of the picture, not of its normalised coordinates, so a non-square image is not
    sheared.
    """
    _, _, h, w = images.shape
    cos, sin = torch.cos(angles) / scales, torch.sin(angles) / scales
    # Output pixel -> input pixel, in grid_sample's [-1, 1] coordinates (x spans w, y spans h).
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], 1),
            torch.stack([sin * w / h, cos, torch.zeros_like(cos)], 1),
        ],
        1,
    )
    theta = on_device(theta.to(images.dtype), images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def shift_and_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 8% of the height (reflect-padded crops), contrast x0.8-1.2 and
    brightness +-20 grey levels."""
    n, _, h, w = images.shape
    pad = max(1, round(0.08 * h))
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = crop(padded, on_device(dy, images.device), on_device(dx, images.device), h, w)
    contrast = on_device(0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator), images.device)
    brightness = on_device((torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 40.0, images.device)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp(0, 255)


def crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Image ``i`` of ``images`` (N, C, H', W') cut to ``h`` x ``w`` from row ``top[i]`` and column
    ``left[i]``: one indexing operation for the whole batch, not one slice per image."""
    n, c = images.shape[:2]
    device = images.device
    rows = (top.view(n, 1) + torch.arange(h, device=device)).view(n, 1, h, 1)
    cols = (left.view(n, 1) + torch.arange(w, device=device)).view(n, 1, 1, w)
    image = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return images[image, channel, rows, cols]


def random_erasing(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """With ``probability``, replace a random rectangle of each image by uniform noise in 0-255."""
    n, c, h, w = images.shape
    out = images.clone()
    chosen = torch.rand(n, generator=generator) < probability
    areas = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * torch.rand(n, generator=generator)
    log_aspect = (torch.rand(n, generator=generator) * 2 - 1) * math.log(1 / ERASE_ASPECT)
    corners = torch.rand(n, 2, generator=generator)
    for i in torch.nonzero(chosen).flatten().tolist():
        aspect = math.exp(float(log_aspect[i]))
        eh = min(h, max(1, round(math.sqrt(float(areas[i]) * h * w * aspect))))
        ew = min(w, max(1, round(math.sqrt(float(areas[i]) * h * w / aspect))))
        top = int(float(corners[i, 0]) * (h - eh + 1))
        left = int(float(corners[i, 1]) * (w - ew + 1))
        noise = torch.rand(c, eh, ew, generator=generator) * 255
        out[i, :, top : top + eh, left : left + ew] = on_device(noise, out.device)
    return out
