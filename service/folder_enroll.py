"""``animalid enroll DIR``: enroll a folder per animal (or a manifest CSV) through the REST API.

The layout is the training package's (``training.data``): ``DIR/<external id>/*.jpg``, or a CSV
``path,individual[,species]`` with paths relative to it. Each animal is enrolled under its folder
name (or manifest label) as external id.

Resumable and idempotent: before sending an animal's photos it asks the API which photos (by
SHA-256 of the file) that animal already has, and sends only the others; the API itself never
stores one photo twice for one animal. An interrupted run, run again, carries on where it stopped.
A photo the API refuses is recorded with the API's code and message and the run goes on; an error
that is not about one photo (no such species, a wrong key, the service not ready) stops the run.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.client import AnimalIDClient, ApiError
from training.data import load_dataset

# Answers about the photos sent (unreadable, wrong format, too large, invalid form): the run goes
# on without them. Any other error status stops the run.
PHOTO_ERROR_STATUSES = frozenset({400, 413, 415, 422})


@dataclass(frozen=True)
class Refusal:
    path: Path
    individual: str
    code: str
    message: str


@dataclass
class EnrollSummary:
    individuals: int = 0
    individuals_created: int = 0
    added: int = 0
    already_enrolled: int = 0
    refused: list[Refusal] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = (
            f"{self.individuals} individuals ({self.individuals_created} new): {self.added} photos "
            f"enrolled now, {self.already_enrolled} already enrolled, {len(self.refused)} refused"
        )
        return [head] + [f"  refused {r.path} ({r.individual}): {r.code}: {r.message}" for r in self.refused]


@dataclass(frozen=True)
class Photo:
    path: Path
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def photos_by_individual(source: Path, species: str) -> dict[str, list[Path]]:
    """The photos of ``source`` (folder or manifest) of ``species``, per individual, in file order."""
    dataset = load_dataset(source, species=species, verify_images=False)
    grouped: dict[str, list[Path]] = defaultdict(list)
    for sample in dataset.samples:
        grouped[sample.individual].append(sample.path)
    return dict(grouped)


def count_photos(plan: dict[str, list[Path]]) -> int:
    return sum(len(paths) for paths in plan.values())


def enroll_folder(
    client: AnimalIDClient,
    plan: dict[str, list[Path]],
    species: str,
    batch_size: int,
    on_progress: Callable[[int], None] = lambda done: None,
) -> EnrollSummary:
    """Enroll every photo of ``plan`` that its individual does not have yet; ``on_progress(n)``
    after every ``n`` photos handled (sent, skipped or refused)."""
    summary = EnrollSummary()
    for individual, paths in plan.items():
        summary.individuals += 1
        existing = client.find_individual(species, individual)
        known = client.image_hashes(existing.id) if existing is not None else set()
        todo = []
        for path in paths:
            photo = Photo(path, path.read_bytes())
            if photo.sha256 in known:
                summary.already_enrolled += 1
                on_progress(1)
            else:
                known.add(photo.sha256)  # the same file twice in one folder is sent once
                todo.append(photo)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            _send(client, species, individual, batch, summary)
            on_progress(len(batch))
    return summary


def _send(
    client: AnimalIDClient, species: str, individual: str, batch: list[Photo], summary: EnrollSummary
) -> None:
    try:
        result = client.enroll(species, [(p.path.name, p.data) for p in batch], external_id=individual)
    except ApiError as exc:
        if exc.status not in PHOTO_ERROR_STATUSES:
            raise
        if len(batch) == 1:
            summary.refused.append(Refusal(batch[0].path, individual, exc.code, exc.message))
            return
        # One bad photo refuses the whole request: send them one by one to find which.
        for photo in batch:
            _send(client, species, individual, [photo], summary)
        return
    summary.individuals_created += int(result.individual_created)
    created = sum(image.created for image in result.images)
    summary.added += created
    summary.already_enrolled += len(result.images) - created
