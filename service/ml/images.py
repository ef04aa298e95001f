"""Uploaded bytes -> a checked RGB image, using the training package's decoder.

Order of checks, cheapest first and before any pixel data is decoded: non-empty, magic bytes of an
allowed format (``training.preprocess.IMAGE_FORMATS``: JPEG, PNG, WebP, BMP, PGM/PPM; never the
file name or the client's content type), header
dimensions against the per-image pixel cap and the minimum side, the pixels of all a request's
images against the per-request budget, then the decode by :func:`training.preprocess.open_image`
with the same format allow-list, reduced toward the model's input size, and last the
uninformative-image check. Pillow's own decompression-bomb limit stays in force.

Memory: at most ``ImagePolicy.decodes`` full-size decodes run at once in the process (a request
beyond that waits for a slot), each holding at most 4 bytes per pixel of one image; what a request
keeps afterwards is its images reduced to a few times the model's input size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import ExifTags, Image

from service.errors import (
    ImageTooLarge,
    ImageUninformative,
    ImageUnreadable,
    InvalidRequest,
    PixelBudgetExceeded,
    UnsupportedMediaType,
)
from training.preprocess import ALLOWED_FORMATS, FORMATS_TEXT, image_format, open_image

_SIGNATURES: tuple[tuple[str, bytes], ...] = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("BMP", b"BM"),
)

# What a few refused formats look like, to say what was sent.
_KNOWN_OTHERS: tuple[tuple[str, bytes], ...] = (
    ("GIF", b"GIF8"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
    ("PDF", b"%PDF"),
    ("FITS", b"SIMPLE  ="),
    ("ICO", b"\x00\x00\x01\x00"),
)


class InvalidBase64(InvalidRequest):
    code = "invalid_base64"


@dataclass(frozen=True)
class ImagePolicy:
    """What an image must satisfy to be decoded and used, and how many decode at once."""

    max_pixels: int  # width x height of one image
    max_request_pixels: int  # all images of one request together
    min_side: int = 1  # shorter side, in pixels
    min_std: float = 0.0  # standard deviation of the grey levels (0-255); 0 turns the check off
    # Full-size decodes running at once in the process; more wait for a slot (never refused).
    decodes: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))

    def for_stored_images(self) -> ImagePolicy:
        """Images the service already accepted (re-embedding): caps and slots, no quality gate."""
        return replace(self, min_side=1, min_std=0.0, max_request_pixels=self.max_pixels)


@dataclass(frozen=True)
class Header:
    format: str
    width: int  # as displayed: EXIF orientation applied
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DecodedImage:
    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    image: Image.Image  # RGB, EXIF orientation applied

    @property
    def extension(self) -> str:
        return image_format(self.format).extension


def sniff_format(data: bytes) -> str | None:
    """The allowed format the bytes claim to be, by magic number, or None."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for name, magic in _SIGNATURES:
        if data.startswith(magic):
            return name
    # Netpbm: "P1".."P6" then whitespace (PBM, PGM, PPM, plain or raw); not PFM's "Pf"/"PF".
    if len(data) >= 3 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "PPM"
    return None


def describe_other(data: bytes) -> str:
    for name, magic in _KNOWN_OTHERS:
        if data.startswith(magic):
            return name
    return "unknown"


def decode_base64(value: str, field: str = "image") -> bytes:
    """Standard base64, optionally as a ``data:image/...;base64,`` URL."""
    text = value.strip()
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise InvalidBase64(f"{field} is a data URL without a comma", field=field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"{field} is not valid base64", field=field) from exc


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def inspect_image(data: bytes, policy: ImagePolicy, field: str = "image") -> Header:
    """Format and displayed size from the header alone, checked against the policy's size rules."""
    if not data:
        raise ImageUnreadable(f"{field} is empty", field=field)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaType(
            f"{field} is not a {FORMATS_TEXT} image", field=field, detected=describe_other(data)
        )
    max_pixels = policy.max_pixels
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as header:
            width, height = header.size
            orientation = _orientation(header)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{field} has too many pixels", field=field, max_pixels=max_pixels) from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is the client's
        raise ImageUnreadable(f"{field} is not a readable {fmt} image", field=field, format=fmt) from exc
    if width <= 0 or height <= 0:
        raise ImageUnreadable(f"{field} has no pixels", field=field, format=fmt)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{field} is {width}x{height}, above the {max_pixels} pixel limit",
            field=field,
            width=width,
            height=height,
            max_pixels=max_pixels,
        )
    if min(width, height) < policy.min_side:
        raise ImageUninformative(
            f"{field} is {width}x{height}; both sides must be at least {policy.min_side} pixels",
            field=field,
            reason="too_small",
            width=width,
            height=height,
            min_side=policy.min_side,
        )
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return Header(format=fmt, width=width, height=height)


def _orientation(header: Image.Image) -> int | None:
    """The EXIF orientation found while reading the header. Never ``getexif()``: for a PNG it
    decodes the whole image to look for an eXIf chunk after the pixel data."""
    raw = header.info.get("exif")
    if not isinstance(raw, bytes):
        return None
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(ExifTags.Base.Orientation)


def decode_images(
    items: Sequence[tuple[str, bytes]], policy: ImagePolicy, size: tuple[int, int] | None
) -> list[DecodedImage]:
    """Decode a request's images, given as (field, bytes): every header and the request's pixel
    budget are checked before the first pixel is decoded. ``size`` is the model input (height,
    width) the images are reduced toward; None decodes at full size."""
    headers = [inspect_image(data, policy, name) for name, data in items]
    total = sum(header.pixels for header in headers)
    if total > policy.max_request_pixels:
        raise PixelBudgetExceeded(
            f"the request's images have {total} pixels together, above the {policy.max_request_pixels} "
            "pixel budget of one request",
            pixels=total,
            max_request_pixels=policy.max_request_pixels,
        )
    return [
        _decode(data, header, policy, size, name) for (name, data), header in zip(items, headers, strict=True)
    ]


def decode_image(
    data: bytes, policy: ImagePolicy, size: tuple[int, int] | None = None, field: str = "image"
) -> DecodedImage:
    return decode_images([(field, data)], policy, size)[0]


def _decode(
    data: bytes, header: Header, policy: ImagePolicy, size: tuple[int, int] | None, field: str
) -> DecodedImage:
    fmt = header.format
    with policy.decodes:
        try:
            image = open_image(data, formats=ALLOWED_FORMATS, size=size)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(
                f"{field} has too many pixels", field=field, max_pixels=policy.max_pixels
            ) from exc
        except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the client's
            raise ImageUnreadable(f"{field} could not be decoded as {fmt}", field=field, format=fmt) from exc
    if policy.min_std > 0:
        spread = float(np.asarray(image.convert("L"), dtype=np.float32).std())
        if spread < policy.min_std:
            raise ImageUninformative(
                f"{field} is nearly one flat colour (grey-level deviation {spread:.2f}, at least "
                f"{policy.min_std} needed)",
                field=field,
                reason="flat",
                std=round(spread, 3),
                min_std=policy.min_std,
            )
    return DecodedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        width=header.width,  # of the upload as displayed, not of the reduced decode
        height=header.height,
        image=image,
    )
