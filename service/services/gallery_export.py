"""The gallery as a dataset: a species' enrolled images, one folder per individual, plus a manifest.

``manifest.csv`` has the columns the training package reads (``path,individual,species``) and
``group``: the enrolment batch (the audited enroll request that stored the image), the session key
that closed-set evaluation holds back whole. An image with no audited request (enrolled before the
audit log, or its entry pruned) is grouped by the day it was stored. ``external_id`` and
``image_id`` tie rows back to the database. The manifest is written last, under a temporary name
renamed into place, so a folder with a manifest holds a complete export.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from service.db.job_repository import JobRepository
from service.db.repository import Repository
from service.errors import InvalidRequest, SpeciesNotFound
from service.image_store import ImageStore, ImageStoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
COLUMNS = ("path", "individual", "species", "group", "external_id", "image_id")


@dataclass(frozen=True)
class GalleryExport:
    manifest: Path
    individuals: int
    images: int
    groups: int
    unreadable: tuple[str, ...]  # image ids whose stored file could not be read


def export_gallery(session: Session, store: ImageStore, species: str, out: Path) -> GalleryExport:
    """Write ``out/<individual id>/<image id>.<ext>`` and ``out/manifest.csv``; ``out`` must be empty."""
    found = Repository(session).species_by_name(species)
    if found is None:
        raise SpeciesNotFound(f"unknown species {species!r}", species=species)
    if out.exists() and any(out.iterdir()):
        raise InvalidRequest(f"{out} is not empty; export into a new folder", out=str(out))
    repo = JobRepository(session)
    batches = repo.enrolment_batches(species)
    rows: list[tuple[str, ...]] = []
    unreadable: list[str] = []
    for image in repo.gallery_images(found.id):
        try:
            data = store.read(image.storage_path)
        except ImageStoreError as exc:
            log.error("gallery export of %s: image %s unreadable: %s", species, image.image_id, exc)
            unreadable.append(str(image.image_id))
            continue
        individual = str(image.individual_id)
        relative = f"{individual}/{image.image_id}{Path(image.storage_path).suffix}"
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        batch = batches.get(str(image.image_id))
        group = f"enroll-{batch}" if batch is not None else f"day-{image.created_at:%Y%m%d}"
        rows.append((relative, individual, species, group, image.external_id or "", str(image.image_id)))
    if not rows:
        raise InvalidRequest(f"species {species!r} has no readable enrolled images", species=species)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".{MANIFEST}.partial"
    with partial.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    partial.replace(out / MANIFEST)
    return GalleryExport(
        manifest=out / MANIFEST,
        individuals=len({r[1] for r in rows}),
        images=len(rows),
        groups=len({(r[1], r[3]) for r in rows}),
        unreadable=tuple(unreadable),
    )
