"""Decoding uploads with bounded memory (issue 15, item 3): reduced toward the model input, 16-bit
without a float64 copy, the same pixels for the model, and a cap on concurrent decodes that queues."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
from hostile import sixteen_bit
from imagegen import encode, jpeg, photo
from PIL import Image

from service.ml.images import ImagePolicy, decode_image
from training.preprocess import REDUCING_GAP, PreprocessSpec, open_image, to_uint8_tensor


def test_a_16_bit_image_decodes_without_a_float64_copy() -> None:
    data = sixteen_bit(2000)  # 4 Mpx: 32 MB as float64
    tracemalloc.start()
    try:
        image = open_image(data, size=(64, 64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.mode == "RGB" and max(image.size) <= 2 * REDUCING_GAP * 64
    assert peak < 8 << 20, f"numpy allocated {peak / 2**20:.1f} MB at peak"
    full = np.asarray(open_image(data).convert("L"), dtype=np.int32)
    assert full.max() == 255 and full.min() == 0  # still scaled to its maximum, in integers


def test_uploads_are_decoded_toward_the_model_input_and_keep_their_size_on_record() -> None:
    big = encode(photo(3, size=80).resize((3000, 2000)), "JPEG", quality=90)
    policy = ImagePolicy(max_pixels=40_000_000, max_request_pixels=40_000_000)
    decoded = decode_image(big, policy, (64, 64))
    assert (decoded.width, decoded.height) == (3000, 2000)
    assert min(decoded.image.size) >= 64 * REDUCING_GAP and max(decoded.image.size) <= 3000 // 4


def test_reduced_decoding_gives_the_model_the_same_pixels() -> None:
    """The oracle: a full-size decode resized by the eval transform, against the reduced decode."""
    spec = PreprocessSpec(input_size=(64, 64))
    rng = np.random.default_rng(5)
    smooth = Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).resize(
        (2400, 1600), Image.Resampling.BICUBIC
    )
    for data in (encode(smooth, "PNG"), encode(smooth, "JPEG", quality=95)):
        full = to_uint8_tensor(open_image(data), spec).float()
        reduced = to_uint8_tensor(open_image(data, size=spec.input_size), spec).float()
        assert (full - reduced).abs().mean() < 1.0 and (full - reduced).abs().max() <= 12


def test_decodes_beyond_the_cap_wait_for_a_slot_rather_than_fail() -> None:
    policy = ImagePolicy(max_pixels=10**7, max_request_pixels=10**7, decodes=threading.BoundedSemaphore(1))
    done: list[object] = []
    policy.decodes.acquire()  # the only slot is busy
    worker = threading.Thread(target=lambda: done.append(decode_image(jpeg(3), policy, (64, 64))))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive() and not done  # queued
    policy.decodes.release()
    worker.join(30)
    assert len(done) == 1  # and served
