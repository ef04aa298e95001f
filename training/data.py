"""Datasets: manifests and folders, identity-disjoint seeded splits, and packed pixel shards.

A dataset source is either a manifest CSV ``path,individual,species`` (paths relative to the CSV)
or a folder holding one sub-folder per individual. Splits are always by individual, so test
individuals never appear in training. An optional *group* key (a regex over the file name, for
example the video-clip prefix of cattle frames) keeps near-duplicate frames together whenever an
individual's images are divided (the enrol/query halves of the evaluation protocol).

A manifest may name each photo's group in a ``group`` column (a gallery export writes the
enrolment batch there); it wins over a group pattern.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from training.preprocess import IMAGE_SUFFIXES, PreprocessSpec, open_image, to_uint8_tensor

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A manifest or folder cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Sample:
    path: Path
    individual: str
    species: str
    group: str
    line: int = 0  # manifest line (1-based, header is line 1); 0 for folder datasets


@dataclass(frozen=True)
class Dataset:
    samples: tuple[Sample, ...]
    source: str
    skipped: tuple[str, ...] = ()

    @property
    def individuals(self) -> list[str]:
        return sorted({s.individual for s in self.samples})

    def fingerprint(self) -> str:
        """Hash of (species, individual, file name, file content) of every sample: the same photos
        give the same fingerprint wherever the data set lives; a replaced photo changes it."""
        digest = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: (s.individual, s.path.name, str(s.path))):
            content = hashlib.sha256(s.path.read_bytes()).hexdigest() if s.path.exists() else "missing"
            digest.update(f"{s.species}\0{s.individual}\0{s.path.name}\0{content}\n".encode())
        return digest.hexdigest()[:16]


def _group_of(path: Path, individual: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is not None:
        match = pattern.search(path.name)
        if match:
            # The first group that took part in the match: alternatives (a|b) can cover several
            # naming schemes, each with its own group.
            key = next((g for g in match.groups() if g is not None), match.group(0))
            return f"{individual}/{key}"
    return f"{individual}/{path.name}"


def _check_image(path: Path) -> None:
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DatasetError(f"unreadable image: {exc}") from exc


def read_manifest(
    csv_path: str | Path,
    *,
    species: str | None = None,
    group_pattern: str | None = None,
    exclude_individuals: str | None = None,
    skip_bad: bool = False,
    verify_images: bool = True,
) -> Dataset:
    """Read a ``path,individual,species`` manifest.

    A missing file, empty label or unreadable image raises :class:`DatasetError` naming the file
    and line, or, with ``skip_bad``, is skipped and counted in ``Dataset.skipped``.
    ``exclude_individuals`` is a regex over individual ids to leave out (the cattle open-set cows).
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    pattern = re.compile(group_pattern) if group_pattern else None
    exclude = re.compile(exclude_individuals) if exclude_individuals else None
    samples: list[Sample] = []
    skipped: list[str] = []
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "individual"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(
                f"{csv_path}:1: header must have path,individual[,species]; missing {sorted(missing)}"
            )
        for row in reader:
            line = reader.line_num
            try:
                rel = (row.get("path") or "").strip()
                individual = (row.get("individual") or "").strip()
                row_species = (row.get("species") or "").strip() or species
                if not rel:
                    raise DatasetError("empty path")
                if not individual:
                    raise DatasetError("empty individual label")
                if not row_species:
                    raise DatasetError("empty species (give --species for manifests without the column)")
                if species and row_species != species:
                    continue
                if exclude is not None and exclude.search(individual):
                    continue
                path = (root / rel).resolve()
                if not path.is_file():
                    raise DatasetError(f"missing file {rel}")
                if verify_images:
                    _check_image(path)
            except DatasetError as exc:
                message = f"{csv_path}:{line}: {exc}"
                if not skip_bad:
                    raise DatasetError(message) from exc
                skipped.append(message)
                continue
            session = (row.get("group") or "").strip()
            group = f"{individual}/{session}" if session else _group_of(path, individual, pattern)
            samples.append(Sample(path, individual, row_species, group, line))
    if skipped:
        log.warning("skipped %d bad rows of %s", len(skipped), csv_path)
    if not samples:
        raise DatasetError(f"{csv_path}: no usable images")
    return Dataset(tuple(samples), str(csv_path), tuple(skipped))


def read_folder(
    root: str | Path,
    *,
    species: str,
    group_pattern: str | None = None,
    skip_bad: bool = False,
    verify_images: bool = True,
) -> Dataset:
    """Read a folder with one sub-folder per individual."""
    root = Path(root)
    pattern = re.compile(group_pattern) if group_pattern else None
    samples: list[Sample] = []
    skipped: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                if verify_images:
                    _check_image(path)
            except DatasetError as exc:
                if not skip_bad:
                    raise DatasetError(f"{path}: {exc}") from exc
                skipped.append(f"{path}: {exc}")
                continue
            samples.append(
                Sample(path.resolve(), folder.name, species, _group_of(path, folder.name, pattern))
            )
    if not samples:
        raise DatasetError(f"{root}: no images in per-individual sub-folders")
    return Dataset(tuple(samples), str(root), tuple(skipped))


def load_dataset(
    source: str | Path,
    *,
    species: str | None = None,
    group_pattern: str | None = None,
    exclude_individuals: str | None = None,
    skip_bad: bool = False,
    verify_images: bool = True,
) -> Dataset:
    """A manifest CSV or a per-individual folder. ``verify_images=False`` leaves decoding to the
    reader of the files (``animalid enroll`` lets the service judge each photo)."""
    path = Path(source)
    if path.is_dir():
        if not species:
            raise DatasetError(f"{path}: a folder dataset needs its species")
        return read_folder(
            path, species=species, group_pattern=group_pattern, skip_bad=skip_bad, verify_images=verify_images
        )
    if not path.is_file():
        raise DatasetError(f"{path}: no such manifest or folder")
    return read_manifest(
        path,
        species=species,
        group_pattern=group_pattern,
        exclude_individuals=exclude_individuals,
        skip_bad=skip_bad,
        verify_images=verify_images,
    )


@dataclass(frozen=True)
class IndividualSplit:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def split_individuals(
    dataset: Dataset,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    min_images_eval: int = 2,
    train_fraction: float = 1.0,
    train_on_test: bool = False,
) -> IndividualSplit:
    """Seeded split of individuals into train / validation / test.

    Individuals with fewer than ``min_images_eval`` images cannot be both enrolled and queried,
    so they always go to training. ``train_fraction`` < 1 trains on that share of the training
    individuals only (at least one), leaving validation and test as they are: a learning curve over
    the number of identities. The kept individuals of a smaller share are a subset of a larger one's.
    ``train_on_test`` moves the test individuals into training (a release model) and leaves
    validation as the same seed and fractions give it, so that it calibrates on the same animals.
    """
    counts: dict[str, int] = defaultdict(int)
    for s in dataset.samples:
        counts[s.individual] += 1
    eligible = sorted(i for i, n in counts.items() if n >= min_images_eval)
    rest = sorted(i for i, n in counts.items() if n < min_images_eval)
    rng = random.Random(seed)
    rng.shuffle(eligible)
    n_test = round(len(counts) * test_fraction)
    n_val = round(len(counts) * val_fraction)
    if test_fraction > 0:
        n_test = max(n_test, 2)
    if val_fraction > 0:
        n_val = max(n_val, 2)
    if n_test + n_val > len(eligible):
        raise DatasetError(
            f"{dataset.source}: {len(eligible)} individuals with >= {min_images_eval} images "
            f"cannot fill {n_test} test and {n_val} validation individuals"
        )
    test = eligible[:n_test]
    val = eligible[n_test : n_test + n_val]
    train = eligible[n_test + n_val :] + rest
    if train_fraction < 1.0:
        random.Random(f"{seed}:train_fraction").shuffle(train)
        train = train[: max(1, round(len(train) * train_fraction))]
    if train_on_test:
        train, test = train + test, []
    return IndividualSplit(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)))


def enrol_query_split(
    individuals: Sequence[str], groups: Sequence[str], rng: random.Random, enrol_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per individual, enrol about ``enrol_fraction`` of its images and query the rest.

    Whole groups move together, so near-duplicate frames of one clip never sit on both sides.
    An individual with a single group falls back to splitting its images (this is counted by
    :func:`single_group_individuals` and reported). Every individual gets at least one enrolled and
    one query image when it has two or more images. Returns index arrays (enrol, query).
    """
    by_individual: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (ind, grp) in enumerate(zip(individuals, groups, strict=True)):
        by_individual[ind][grp].append(i)
    enrol: list[int] = []
    query: list[int] = []
    for ind in sorted(by_individual):
        group_lists = [by_individual[ind][g] for g in sorted(by_individual[ind])]
        total = sum(len(g) for g in group_lists)
        if len(group_lists) == 1:
            group_lists = [[i] for i in group_lists[0]]
        rng.shuffle(group_lists)
        target = max(1, round(total * enrol_fraction))
        taken: list[int] = []
        for k, members in enumerate(group_lists):
            last = k == len(group_lists) - 1
            # take the group while that brings the enrolled count closer to the target
            closer = len(taken) + len(members) - target <= target - len(taken)
            if not taken or (not last and closer):
                taken.extend(members)
            else:
                query.extend(members)
        enrol.extend(taken)
    return np.array(sorted(enrol), dtype=np.int64), np.array(sorted(query), dtype=np.int64)


def single_group_individuals(individuals: Sequence[str], groups: Sequence[str]) -> list[str]:
    seen: dict[str, set[str]] = defaultdict(set)
    for ind, grp in zip(individuals, groups, strict=True):
        seen[ind].add(grp)
    return sorted(i for i, g in seen.items() if len(g) < 2)


@dataclass
class Shard:
    """Decoded, resized uint8 pixels of a dataset, with labels: what training reads."""

    pixels: torch.Tensor  # (N, 3, H, W) uint8
    individuals: list[str]
    groups: list[str]
    paths: list[str]
    species: str
    fingerprint: str

    def subset(self, keep: set[str]) -> Shard:
        """Every sample of the individuals in ``keep``, in order."""
        return self.take([i for i, ind in enumerate(self.individuals) if ind in keep])

    def take(self, indices: Sequence[int] | np.ndarray) -> Shard:
        """The samples at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return Shard(
            self.pixels[idx],
            [self.individuals[i] for i in idx],
            [self.groups[i] for i in idx],
            [self.paths[i] for i in idx],
            self.species,
            self.fingerprint,
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "species": self.species,
            "fingerprint": self.fingerprint,
            "individuals": json.dumps(self.individuals),
            "groups": json.dumps(self.groups),
            "paths": json.dumps(self.paths),
        }
        save_file({"pixels": self.pixels.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Shard:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        pixels = load_file(str(path))["pixels"]
        return cls(
            pixels,
            json.loads(meta["individuals"]),
            json.loads(meta["groups"]),
            json.loads(meta["paths"]),
            meta["species"],
            meta["fingerprint"],
        )


def build_shard(dataset: Dataset, spec: PreprocessSpec) -> Shard:
    """Decode every image once with the shared preprocessing (by content, RGB, resized)."""
    pixels = torch.empty((len(dataset.samples), 3, *spec.input_size), dtype=torch.uint8)
    for i, s in enumerate(dataset.samples):
        try:
            pixels[i] = to_uint8_tensor(open_image(s.path, size=spec.input_size), spec)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            where = f"{dataset.source}:{s.line}" if s.line else str(s.path)
            raise DatasetError(f"{where}: unreadable image {s.path.name}: {exc}") from exc
    species = {s.species for s in dataset.samples}
    if len(species) != 1:
        raise DatasetError(f"{dataset.source}: a shard holds one species, found {sorted(species)}")
    return Shard(
        pixels,
        [s.individual for s in dataset.samples],
        [s.group for s in dataset.samples],
        [str(s.path) for s in dataset.samples],
        species.pop(),
        dataset.fingerprint(),
    )


def cached_shard(dataset: Dataset, spec: PreprocessSpec, cache_dir: str | Path | None) -> Shard:
    """:func:`build_shard`, reusing a shard file in ``cache_dir`` with the same fingerprint and spec."""
    if cache_dir is None:
        return build_shard(dataset, spec)
    # The pixels depend on the files and the spec; the labels and groups stored beside them on the
    # dataset's reading (a group pattern, an exclusion), so all of it keys the file.
    labels = hashlib.sha256(
        "\n".join(f"{s.path}\0{s.individual}\0{s.group}" for s in dataset.samples).encode()
    )
    key = hashlib.sha256(
        f"{dataset.fingerprint()}|{labels.hexdigest()}|{json.dumps(spec.to_dict(), sort_keys=True)}".encode()
    ).hexdigest()[:16]
    species = dataset.samples[0].species
    path = Path(cache_dir) / f"{species}-{spec.input_size[0]}x{spec.input_size[1]}-{key}.safetensors"
    if path.is_file():
        return Shard.load(path)
    shard = build_shard(dataset, spec)
    shard.save(path)
    return shard
