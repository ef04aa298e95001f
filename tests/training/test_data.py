import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from shared_data import shared_manifest
from synthetic import make_folder_dataset, write_manifest

from training.data import (
    DatasetError,
    build_shard,
    cached_shard,
    enrol_query_split,
    load_dataset,
    read_manifest,
    single_group_individuals,
    split_individuals,
)
from training.preprocess import PreprocessSpec, open_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(tmp_path):
    return make_folder_dataset(tmp_path / "data", n_individuals=10, n_images=4, size=24)


def test_folder_and_manifest_read_the_same_samples(folder):
    manifest = write_manifest(folder, species="goat")
    a = load_dataset(folder, species="goat")
    b = load_dataset(manifest)
    assert [(s.path, s.individual) for s in a.samples] == [(s.path, s.individual) for s in b.samples]
    assert a.fingerprint() == b.fingerprint()


def test_bad_manifest_rows_name_file_and_line_or_are_skipped(folder):
    manifest = write_manifest(folder)
    lines = manifest.read_text().splitlines()
    (folder / "ind000" / "broken.png").write_bytes(b"not an image")
    lines.insert(3, "ind000/missing.png,ind000,testanimal")  # line 4
    lines.insert(5, "ind000/clip0_000.png,,testanimal")  # line 6
    lines.append("ind000/broken.png,ind000,testanimal")
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:4: missing file ind000/missing.png"):
        read_manifest(manifest)
    ds = read_manifest(manifest, skip_bad=True)
    assert len(ds.skipped) == 3
    assert any(":6: empty individual label" in m for m in ds.skipped)
    assert any("unreadable image" in m for m in ds.skipped)
    assert len(ds.samples) == 40


def test_images_are_opened_by_content_and_grey_becomes_rgb(tmp_path):
    png_named_jpg = tmp_path / "really_png.jpg"
    Image.new("L", (10, 12), 128).save(png_named_jpg, format="PNG")
    img = open_image(png_named_jpg)
    assert img.mode == "RGB" and img.size == (10, 12)


def test_individual_split_is_disjoint_seeded_and_keeps_tiny_individuals_in_training(folder):
    (folder / "solo").mkdir()
    Image.new("RGB", (24, 24)).save(folder / "solo" / "only.png")
    ds = load_dataset(folder, species="x")
    a = split_individuals(ds, val_fraction=0.2, test_fraction=0.3, seed=1)
    b = split_individuals(ds, val_fraction=0.2, test_fraction=0.3, seed=1)
    c = split_individuals(ds, val_fraction=0.2, test_fraction=0.3, seed=2)
    assert a == b and a != c
    assert (
        not (set(a.train) & set(a.test))
        and not (set(a.train) & set(a.val))
        and not (set(a.val) & set(a.test))
    )
    assert set(a.train) | set(a.val) | set(a.test) == set(ds.individuals)
    assert "solo" in a.train and len(a.test) == 3 and len(a.val) == 2


def test_train_fraction_keeps_a_nested_share_of_training_individuals_and_the_same_test_ones(tmp_path):
    folder = make_folder_dataset(tmp_path / "data", n_individuals=40, n_images=2, size=24)
    ds = load_dataset(folder, species="x")

    def split(fraction):
        return split_individuals(ds, val_fraction=0.1, test_fraction=0.2, seed=3, train_fraction=fraction)

    full, half, quarter, tiny = split(1.0), split(0.5), split(0.25), split(0.001)
    assert [len(s.train) for s in (full, half, quarter, tiny)] == [28, 14, 7, 1]
    assert set(tiny.train) < set(quarter.train) < set(half.train) < set(full.train)
    assert half.val == quarter.val == full.val and half.test == quarter.test == full.test
    assert half.train == tuple(sorted(half.train))


def test_train_on_test_moves_the_test_individuals_into_training_and_keeps_validation(tmp_path):
    folder = make_folder_dataset(tmp_path / "data", n_individuals=40, n_images=2, size=24)
    ds = load_dataset(folder, species="x")
    study = split_individuals(ds, val_fraction=0.1, test_fraction=0.2, seed=3)
    release = split_individuals(ds, val_fraction=0.1, test_fraction=0.2, seed=3, train_on_test=True)
    assert release.test == () and release.val == study.val
    assert release.train == tuple(sorted(study.train + study.test))


def test_enrol_query_split_keeps_groups_together():
    individuals = ["a"] * 6 + ["b"] * 4 + ["c"] * 3
    groups = ["a/1"] * 3 + ["a/2"] * 2 + ["a/3"] + ["b/1"] * 2 + ["b/2"] * 2 + ["c/1"] * 3
    for seed in range(20):
        enrol, query = enrol_query_split(individuals, groups, random.Random(seed))
        assert sorted(np.concatenate([enrol, query])) == list(range(13))
        enrol_groups = {groups[i] for i in enrol}
        # a group never sits on both sides, except for single-group individual c (frame fallback)
        assert not ({groups[i] for i in query} & enrol_groups - {"c/1"})
        for ind in "abc":
            assert any(individuals[i] == ind for i in enrol) and any(individuals[i] == ind for i in query)
    assert single_group_individuals(individuals, groups) == ["c"]


def test_enrol_query_split_is_about_half_with_equal_groups():
    individuals = ["a"] * 6
    groups = ["a/1", "a/1", "a/2", "a/2", "a/3", "a/3"]
    for seed in range(10):
        enrol, query = enrol_query_split(individuals, groups, random.Random(seed))
        assert (len(enrol), len(query)) in ((2, 4), (4, 2))
    enrol, query = enrol_query_split(["b"] * 10, [f"b/{i}" for i in range(10)], random.Random(0))
    assert (len(enrol), len(query)) == (5, 5)


def test_group_pattern_from_file_names(folder):
    ds = load_dataset(folder, species="x", group_pattern=r"^(clip\d)_")
    assert {s.group for s in ds.samples if s.individual == "ind000"} == {"ind000/clip0", "ind000/clip1"}


def test_group_pattern_alternatives_key_each_naming_scheme_by_its_own_group(tmp_path):
    root = tmp_path / "cows"
    names = [
        "100_200_0001_cls0.jpg",
        "100_200_0002_cls0.jpg",
        "328-2-3-5(1).jpg",
        "328-2-3-5(2).jpg",
        "007.jpg",
    ]
    (root / "cow").mkdir(parents=True)
    for name in names:
        Image.new("RGB", (24, 48)).save(root / "cow" / name, format="JPEG")
    ds = load_dataset(root, species="cattle", group_pattern=r"^(\d+_\d+)_|^(\d+(?:-\d+)*)\(\d+\)")
    groups = {s.path.name: s.group for s in ds.samples}
    assert groups == {
        "100_200_0001_cls0.jpg": "cow/100_200",
        "100_200_0002_cls0.jpg": "cow/100_200",
        "328-2-3-5(1).jpg": "cow/328-2-3-5",
        "328-2-3-5(2).jpg": "cow/328-2-3-5",
        "007.jpg": "cow/007.jpg",  # no scheme matches: the image is its own group
    }


def test_shard_uses_shared_preprocessing(folder, tmp_path):
    ds = load_dataset(folder, species="x")
    spec = PreprocessSpec(input_size=(16, 20))
    shard = build_shard(ds, spec)
    assert shard.pixels.shape == (40, 3, 16, 20) and shard.pixels.dtype == torch.uint8
    shard.save(tmp_path / "s.safetensors")
    again = type(shard).load(tmp_path / "s.safetensors")
    assert torch.equal(again.pixels, shard.pixels) and again.individuals == shard.individuals


def test_every_study_config_keys_cattle_clips_the_same_way():
    patterns = {
        d["group_pattern"]
        for path in (REPO / "configs" / "study").glob("*.yaml")
        for d in yaml.safe_load(path.read_text()).get("datasets", [])
        if "holstein_cowface" in d["source"]
    }
    assert len(patterns) == 1, patterns


def test_real_manifests_read_and_cattle_clips_are_groups():
    study = yaml.safe_load((REPO / "configs" / "study" / "cattle-scratch.yaml").read_text())
    cattle = read_manifest(
        shared_manifest("holstein_cowface"),
        group_pattern=study["datasets"][0]["group_pattern"],
        exclude_individuals=r"^openset-",
        verify_images=False,
    )
    assert len(cattle.individuals) == 82
    assert not single_group_individuals(
        [s.individual for s in cattle.samples], [s.group for s in cattle.samples]
    )
    # Every file name follows one of the naming schemes the study's pattern knows: no image is
    # left as its own group (which would let frames of its clip leak across enrol and query).
    unkeyed = [s.path.name for s in cattle.samples if s.group == f"{s.individual}/{s.path.name}"]
    assert not unkeyed, unkeyed[:5]
    dogs = read_manifest(shared_manifest("dogfacenet"), verify_images=False)
    png_inside = [s for s in dogs.samples if s.path.read_bytes()[:4] == b"\x89PNG"]
    assert png_inside and open_image(png_inside[0].path).mode == "RGB"
    humans = read_manifest(shared_manifest("orl_faces"), verify_images=False)
    assert open_image(humans.samples[0].path).mode == "RGB"


def test_cached_shard_follows_the_group_key(tmp_path):
    root = make_folder_dataset(tmp_path / "data", n_individuals=3, n_images=4, size=16)
    spec = PreprocessSpec(input_size=(16, 16))
    by_clip = cached_shard(
        load_dataset(root, species="goat", group_pattern=r"^(\w+?)_"), spec, tmp_path / "c"
    )
    by_image = cached_shard(load_dataset(root, species="goat"), spec, tmp_path / "c")
    assert len(set(by_clip.groups)) == 6, "two clips per individual"
    assert len(set(by_image.groups)) == 12, "without a pattern every image is its own group"
    torch.testing.assert_close(by_clip.pixels, by_image.pixels)


def test_fingerprint_follows_content_not_location(tmp_path):
    root = make_folder_dataset(tmp_path / "data", n_individuals=3, n_images=2, size=16)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert (
        load_dataset(root, species="goat").fingerprint() == load_dataset(copy, species="goat").fingerprint()
    )
    photo = sorted(copy.rglob("*.png"))[0]
    data = bytearray(photo.read_bytes())
    data[-1] ^= 0xFF  # another photo of the same size
    photo.write_bytes(bytes(data))
    assert (
        load_dataset(root, species="goat").fingerprint() != load_dataset(copy, species="goat").fingerprint()
    )
