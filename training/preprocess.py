"""The one preprocessing path shared by training (evaluation transform) and serving.

Images are opened by content (never by file name), converted to RGB, resized to the model's input
size and normalised. Training caches the uint8 output of :func:`to_uint8_tensor` and applies its
augmentations on top, so training and serving see the same pixels for the same photo.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

PREPROCESS_VERSION = "1"


@dataclass(frozen=True)
class ImageFormat:
    decoder: str  # Pillow's format name
    label: str  # for people
    extension: str  # of a stored original
    media_type: str
    suffixes: tuple[str, ...]  # file names a folder or manifest reader takes


# The one list of image formats, for training and serving alike: a photo that trains a model can be
# enrolled and identified. Anything else is rejected before pixel data is read. Netpbm (Pillow's
# "PPM" decoder: PGM, PPM, PBM) is here because the ORL human control set ships as PGM.
IMAGE_FORMATS = (
    ImageFormat("JPEG", "JPEG", "jpg", "image/jpeg", (".jpg", ".jpeg")),
    ImageFormat("PNG", "PNG", "png", "image/png", (".png",)),
    ImageFormat("WEBP", "WebP", "webp", "image/webp", (".webp",)),
    ImageFormat("BMP", "BMP", "bmp", "image/bmp", (".bmp",)),
    ImageFormat("PPM", "PGM/PPM", "pnm", "image/x-portable-anymap", (".pgm", ".ppm", ".pbm", ".pnm")),
)
ALLOWED_FORMATS = tuple(f.decoder for f in IMAGE_FORMATS)
IMAGE_SUFFIXES = frozenset(suffix for f in IMAGE_FORMATS for suffix in f.suffixes)
FORMATS_TEXT = ", ".join(f.label for f in IMAGE_FORMATS[:-1]) + f" or {IMAGE_FORMATS[-1].label}"


def image_format(decoder: str) -> ImageFormat:
    return next(f for f in IMAGE_FORMATS if f.decoder == decoder)


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become a model input. Stored in every model card."""

    input_size: tuple[int, int] = (112, 112)  # (height, width)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    version: str = PREPROCESS_VERSION

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        return cls(
            input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            version=str(data["version"]),
        )


# How far above the model's input size an image is decoded and box-reduced before the final resize.
# Pillow documents a reducing gap of 3 or more as indistinguishable from a full-size resample in
# most cases (``Image.resize(reducing_gap=...)``); it is what bounds the memory of one decode.
REDUCING_GAP = 3


def open_image(
    source: str | Path | bytes | BinaryIO,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an image by its content and return it as RGB.

    ``formats`` restricts which decoders Pillow may try. Greyscale, palette, CMYK and alpha images
    become 3-channel RGB (alpha is composited on black). EXIF orientation is applied.

    ``size`` (height, width) is the size the image is headed for (the model input). When given,
    the image is decoded and reduced to no less than ``REDUCING_GAP`` times its longer side before
    anything else: JPEG in draft mode (the decoder's 1/2, 1/4, 1/8 DCT scaling), other formats by
    an integer box reduction right after decoding. Training and serving both pass the model's
    input size, so they see the same pixels.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source, formats=list(formats)) as opened:
        side = max(size) * REDUCING_GAP if size is not None else None
        if side is not None and opened.format == "JPEG":
            opened.draft(None, (side, side))
        opened.load()
        img: Image.Image = _reduced(opened, side) if side is not None else opened
        img = ImageOps.exif_transpose(img)
        if img.mode == "RGB":
            return img.copy() if img is opened else img  # exif_transpose copies; be sure
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size)
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = _to_8bit(img)
        return img.convert("RGB")


def _reduced(image: Image.Image, side: int) -> Image.Image:
    """``image`` box-reduced by the largest integer factor that keeps both sides >= ``side``."""
    factor = min(image.width // side, image.height // side)
    if factor < 2:
        return image
    # A box filter over factor x factor blocks is Image.reduce, which 16-bit modes lack.
    return image.resize(
        (-(-image.width // factor), -(-image.height // factor)), Image.Resampling.BOX, reducing_gap=None
    )


def _to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale scaled so its maximum is 255, in integers (no float64 copy)."""
    arr = np.asarray(image)
    top = int(arr.max()) if arr.size else 0
    if top <= 0:
        return Image.new("L", image.size)
    wide = np.uint64 if top >= 2**24 else np.uint32  # x255 must not overflow
    scaled = np.clip(arr, 0, None).astype(wide) * 255 // top
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def to_uint8_tensor(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """Resize an RGB image to the input size: a (3, H, W) uint8 tensor."""
    height, width = spec.input_size
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def on_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (random draws, constants) moved to ``device``. To a GPU it goes from pinned
    memory without blocking: a plain copy from pageable memory makes the CPU wait until the GPU has
    finished all the work queued before it, so the CPU could not prepare the next batch meanwhile."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def normalize(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 pixels (3, H, W) or (N, 3, H, W) on any device -> normalised float32."""
    mean = on_device(torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1), pixels.device)
    std = on_device(torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1), pixels.device)
    return (pixels.float() / 255.0 - mean) / std


def preprocess(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """The evaluation transform: RGB image -> normalised (3, H, W) float32 tensor."""
    return normalize(to_uint8_tensor(image, spec), spec)
