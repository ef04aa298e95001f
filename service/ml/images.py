"""Uploaded bytes -> a checked RGB image, using the training package's decoder.

Order of checks, cheapest first and before any pixel data is decoded: non-empty, magic bytes of an
allowed format (``training.preprocess.IMAGE_FORMATS``: JPEG, PNG, WebP, BMP, PGM/PPM; never the
file name or the client's content type), header
dimensions against the pixel cap, then the full decode by :func:`training.preprocess.open_image`
with the same format allow-list. Pillow's own decompression-bomb limit stays in force.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.errors import ImageTooLarge, ImageUnreadable, InvalidRequest, UnsupportedMediaType
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


def decode_image(data: bytes, max_pixels: int, field: str = "image") -> DecodedImage:
    if not data:
        raise ImageUnreadable(f"{field} is empty", field=field)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaType(
            f"{field} is not a {FORMATS_TEXT} image", field=field, detected=describe_other(data)
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as header:
            width, height = header.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{field} has too many pixels", field=field, max_pixels=max_pixels) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
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
    try:
        image = open_image(data, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{field} has too many pixels", field=field, max_pixels=max_pixels) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the client's
        raise ImageUnreadable(f"{field} could not be decoded as {fmt}", field=field, format=fmt) from exc
    return DecodedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        width=image.width,  # after EXIF orientation
        height=image.height,
        image=image,
    )
