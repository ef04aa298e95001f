"""A corpus of hostile and odd images, generated here (no binary files in the repository).

``corpus()`` maps a name to (bytes, expected status of an image-taking endpoint, expected error
code). Run as a script it writes the corpus to a folder, one file per entry, to try by hand:
``python tests/service/hostile.py /tmp/hostile``.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from imagegen import encode, jpeg, photo
from PIL import Image

OK = 200  # accepted: 200 for identify, verify and explain, 201 for enroll


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png(
    width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 2, extra: bytes = b""
) -> bytes:
    """A PNG with a hand-made header: its IHDR says width x height whatever the data holds."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def huge_png(width: int, height: int) -> bytes:
    """A few hundred bytes that claim width x height pixels (a decompression bomb's header)."""
    return png(width, height, zlib.compress(b"\0" * 1000))


def huge_bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + info + b"\0" * 64


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim another size."""
    data = bytearray(jpeg(7))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def text_bomb_png() -> bytes:
    """A valid small PNG carrying a zTXt chunk that inflates to 64 MB."""
    bomb = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
    good = encode(photo(8), "PNG")
    return good[:33] + bomb + good[33:]  # after the signature and IHDR


def sixteen_bit(size: int) -> bytes:
    """A 16-bit greyscale gradient: tiny to send, size x size x 2 bytes once decoded."""
    ramp = np.linspace(0, 65535, size, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.add.outer(ramp // 2, ramp // 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    photo(9).resize((96, 64)).save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def corpus() -> dict[str, tuple[bytes, int, str | None]]:
    """name -> (bytes, expected status, expected code)."""
    good_jpeg, good_png = jpeg(1), encode(photo(1), "PNG")
    webp = encode(photo(2), "WEBP")
    broken_crc = bytearray(good_png)
    broken_crc[30] ^= 0xFF  # inside IHDR: the CRC no longer matches
    gif = encode(photo(3).convert("P"), "GIF")
    frames = [photo(3).convert("P"), photo(4).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    cmyk = encode(photo(5).convert("CMYK"), "JPEG")
    sixteen = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(sixteen, format="PNG")
    rgba = encode(photo(6).convert("RGBA"), "PNG")
    palette = photo(10).convert("P")
    palette.info["transparency"] = 0
    noise = np.random.default_rng(11).integers(0, 2, (64, 64), dtype=np.uint8) * 255
    pgm = encode(photo(7).convert("L"), "PPM")
    plain_pgm = b"P2\n32 32\n255\n" + b"\n".join(
        " ".join(str((7 * r + 13 * c) % 256) for c in range(32)).encode() for r in range(32)
    )
    return {
        "empty": (b"", 422, "image_unreadable"),
        "text": (b"hello, I am a photo", 415, "unsupported_media_type"),
        "svg": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
            415,
            "unsupported_media_type",
        ),
        "random": (np.random.default_rng(0).bytes(5000), 415, "unsupported_media_type"),
        "gif_named_jpg": (gif, 415, "unsupported_media_type"),
        "animated_gif": (animated.getvalue(), 415, "unsupported_media_type"),
        "tiff": (encode(photo(1), "TIFF"), 415, "unsupported_media_type"),
        "pdf": (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", 415, "unsupported_media_type"),
        "fits": (b"SIMPLE  =                    T" + b" " * 2850, 415, "unsupported_media_type"),
        "jpeg_truncated": (good_jpeg[: len(good_jpeg) // 2], 422, "image_unreadable"),
        "jpeg_header_only": (good_jpeg[:20], 422, "image_unreadable"),
        "jpeg_magic_then_garbage": (b"\xff\xd8\xff" + b"\x00" * 500, 422, "image_unreadable"),
        "png_truncated": (good_png[: len(good_png) // 2], 422, "image_unreadable"),
        "png_bad_crc": (bytes(broken_crc), 422, "image_unreadable"),
        "png_bit_depth_7": (png(64, 64, zlib.compress(b"\0" * 100), bit_depth=7), 422, "image_unreadable"),
        "png_zero_size": (png(0, 0, zlib.compress(b"")), 422, "image_unreadable"),
        "png_header_ok_data_garbage": (huge_png(1000, 1000), 422, "image_unreadable"),
        "png_ztxt_64mb_bomb": (text_bomb_png(), 422, "image_unreadable"),
        "webp_truncated": (webp[: len(webp) // 2], 422, "image_unreadable"),
        "png_30000x30000_header": (huge_png(30000, 30000), 413, "image_too_large"),
        "png_100000x100000_header": (huge_png(100000, 100000), 413, "image_too_large"),
        "bmp_20000x20000_header": (huge_bmp(20000, 20000), 413, "image_too_large"),
        "jpeg_claiming_65000x65000": (jpeg_claiming(65000, 65000), 413, "image_too_large"),
        "png_1x1": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), 422, "image_uninformative"),
        "png_200x8_strip": (encode(photo(12).resize((200, 8)), "PNG"), 422, "image_uninformative"),
        "png_black_500x500": (encode(Image.new("RGB", (500, 500)), "PNG"), 422, "image_uninformative"),
        "jpeg_grey_300x300": (
            encode(Image.new("RGB", (300, 300), (128, 128, 128)), "JPEG"),
            422,
            "image_uninformative",
        ),
        "png_named_jpg": (good_png, OK, None),
        "jpeg_progressive": (encode(photo(13), "JPEG", progressive=True), OK, None),
        "jpeg_exif_rotated": (exif_rotated(), OK, None),
        "jpeg_with_trailing_zip": (good_jpeg + b"PK\x03\x04" + b"\0" * 200, OK, None),
        "png_interlaced": (encode(photo(14), "PNG", interlace=1), OK, None),
        "png_palette_transparent": (encode(palette, "PNG"), OK, None),
        "png_1_bit": (encode(Image.fromarray(noise).convert("1"), "PNG"), OK, None),
        "png_grey_alpha": (encode(photo(15).convert("LA"), "PNG"), OK, None),
        "webp": (webp, OK, None),
        "webp_lossless": (encode(photo(16), "WEBP", lossless=True), OK, None),
        "bmp": (encode(photo(2), "BMP"), OK, None),
        "cmyk_jpeg": (cmyk, OK, None),
        "png_16_bit_grey": (sixteen.getvalue(), OK, None),
        "png_16_bit_grey_3000x3000": (sixteen_bit(3000), OK, None),
        "png_rgba": (rgba, OK, None),
        # ORL's human faces are PGM files: training takes them, so does the service.
        "pgm": (pgm, OK, None),
        "ppm": (encode(photo(7), "PPM"), OK, None),
        "pgm_plain": (plain_pgm, OK, None),
        "pgm_truncated": (pgm[: len(pgm) // 2], 422, "image_unreadable"),
        "pfm_float": (b"Pf\n2 2\n-1.0\n" + b"\0" * 16, 415, "unsupported_media_type"),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "hostile-images")
    out.mkdir(parents=True, exist_ok=True)
    for name, (data, status, code) in sorted(corpus().items()):
        (out / name).write_bytes(data)
        print(f"{name:32} {len(data):>9} bytes  expect {status} {code or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
