import math
from dataclasses import replace

import pytest
import torch

from training.augment import ERASE_AREA, augment, crop, random_erasing, rotate_and_zoom
from training.config import build_config

NONE = build_config({"augment": False, "hflip": False})


def _pixels(n=4, h=12, w=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=generator, dtype=torch.uint8)


def test_with_every_augmentation_off_the_pixels_are_unchanged():
    pixels = _pixels()
    assert torch.equal(augment(pixels, torch.Generator().manual_seed(1), NONE), pixels)


def test_a_quarter_turn_is_a_counter_clockwise_rot90_and_a_half_turn_flips_both_axes():
    square = _pixels(h=6, w=6).float()
    quarter = rotate_and_zoom(square, torch.full((4,), math.pi / 2), torch.ones(4))
    torch.testing.assert_close(quarter, torch.rot90(square, 1, (-2, -1)), atol=1e-3, rtol=0)
    portrait = _pixels(h=12, w=8).float()
    half = rotate_and_zoom(portrait, torch.full((4,), math.pi), torch.ones(4))
    torch.testing.assert_close(half, portrait.flip(-1).flip(-2), atol=1e-3, rtol=0)


def test_no_rotation_and_no_zoom_is_the_identity_and_zooming_in_by_two_halves_distances():
    images = _pixels(h=8, w=8).float()
    same = rotate_and_zoom(images, torch.zeros(4), torch.ones(4))
    torch.testing.assert_close(same, images, atol=1e-3, rtol=0)
    # A ramp p[.., j] = j: output column j samples input column 3.5 + (j + 0.5 - 4) / 2, i.e. 1.75 + j/2.
    ramp = torch.arange(8.0).expand(1, 3, 8, 8)
    zoomed = rotate_and_zoom(ramp, torch.zeros(1), torch.full((1,), 2.0))
    torch.testing.assert_close(zoomed[0, 0, 4], 1.75 + torch.arange(8.0) / 2, atol=1e-4, rtol=0)


def test_random_erasing_blanks_one_rectangle_of_the_configured_size_in_each_chosen_image():
    images = torch.full((50, 3, 40, 30), 7.0)
    erased = random_erasing(images, torch.Generator().manual_seed(3), probability=1.0)
    for image in erased:
        changed = (image != 7.0).any(dim=0)
        rows, cols = torch.nonzero(changed, as_tuple=True)
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        share = height * width / (40 * 30)
        assert ERASE_AREA[0] * 0.5 <= share <= ERASE_AREA[1] * 1.5
        assert changed.sum() >= 0.95 * height * width  # a filled rectangle (noise may hit 7 by chance)
    untouched = random_erasing(images, torch.Generator().manual_seed(3), probability=0.0)
    assert torch.equal(untouched, images)


def test_the_same_generator_seed_draws_the_same_augmentation():
    config = replace(NONE, augment=True, hflip=True, rotate_degrees=15.0, zoom=0.1, erase_probability=0.5)
    pixels = _pixels(n=16)
    first = augment(pixels, torch.Generator().manual_seed(5), config)
    again = augment(pixels, torch.Generator().manual_seed(5), config)
    other = augment(pixels, torch.Generator().manual_seed(6), config)
    assert first.dtype == torch.uint8 and first.shape == pixels.shape
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(
    "values", [{"rotate_degrees": -1}, {"rotate_degrees": 181}, {"zoom": 1.0}, {"erase_probability": 1.5}]
)
def test_out_of_range_augmentation_settings_are_refused(values):
    with pytest.raises(ValueError, match="rotate_degrees"):
        build_config(values)


def test_crop_cuts_each_image_where_its_own_offsets_say():
    images = _pixels(n=5, h=14, w=11).float()
    top, left = torch.tensor([0, 3, 1, 4, 2]), torch.tensor([2, 0, 3, 1, 0])
    cut = crop(images, top, left, 9, 7)
    for i in range(5):
        assert torch.equal(cut[i], images[i, :, top[i] : top[i] + 9, left[i] : left[i] + 7])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_augmented_on_the_gpu_is_the_one_the_cpu_draws(ieee_fp32):
    config = replace(NONE, augment=True, hflip=True, rotate_degrees=15.0, zoom=0.1, erase_probability=0.5)
    pixels = _pixels(n=32, h=40, w=32)
    on_cpu = augment(pixels, torch.Generator().manual_seed(5), config)
    on_gpu = augment(pixels.cuda(), torch.Generator().manual_seed(5), config)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    # the same draws; bilinear sampling may round a pixel to the next grey level
    difference = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01
