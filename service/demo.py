"""``animalid demo``: the bundled model and sample gallery, served on the embedded SQLite database.

Layout of the bundled data (``service/demo/``): ``models/<species>/`` an exported artifact,
``gallery/<individual>/*.jpg`` photos enrolled at start-up (once: enrolling is idempotent), and
``queries/*.jpg`` photos to try ``/identify`` with.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from service.errors import ConfigurationError
from service.runtime import Runtime
from service.security import Principal, Scope
from service.services import enrollment
from service.services.enrollment import EnrollCommand
from training.preprocess import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_ACTOR = Principal(scope=Scope.ADMIN, fingerprint="demo")


@dataclass(frozen=True)
class DemoPaths:
    models: Path = DEMO_DIR / "models"
    gallery: Path = DEMO_DIR / "gallery"
    queries: Path = DEMO_DIR / "queries"


@dataclass(frozen=True)
class GallerySummary:
    species: str
    individuals: int
    images_added: int
    images_present: int


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pick_species(runtime: Runtime, wanted: str | None) -> str:
    serving = sorted(name for name, slot in runtime.registry.slots.items() if slot.serving is not None)
    if wanted is not None:
        runtime.registry.serving(wanted)
        return wanted
    if len(serving) != 1:
        raise ConfigurationError(
            "the demo needs exactly one serving species to enroll the gallery into, "
            f"found {serving or 'none'}; choose one with --species"
        )
    return serving[0]


def enroll_gallery(runtime: Runtime, gallery: Path, species: str | None = None) -> GallerySummary:
    """Enroll ``gallery/<individual>/*`` under external id ``<individual>``.

    Photos already enrolled are skipped (enrolling is idempotent), so a restart enrolls nothing twice.
    """
    name = pick_species(runtime, species)
    chunk = runtime.settings.max_images_per_request
    individuals = added = present = 0
    for folder in sorted(p for p in gallery.iterdir() if p.is_dir()) if gallery.is_dir() else []:
        photos = image_files(folder)
        if not photos:
            continue
        individuals += 1
        for start in range(0, len(photos), chunk):
            command = EnrollCommand(
                species=name,
                images=[p.read_bytes() for p in photos[start : start + chunk]],
                external_id=folder.name,
                name=folder.name,
            )
            with runtime.sessions() as session:
                outcome = enrollment.enroll(
                    session,
                    runtime.registry,
                    runtime.store,
                    runtime.metrics,
                    runtime.images,
                    chunk,
                    command,
                    DEMO_ACTOR,
                )
            created = sum(image.created for image in outcome.result.images)
            added += created
            present += len(outcome.result.images) - created
    return GallerySummary(species=name, individuals=individuals, images_added=added, images_present=present)


def curl_command(api_url: str, species: str, query: Path | None) -> str:
    image = str(query) if query is not None else "photo.jpg"
    return f"curl -s -F species={shlex.quote(species)} -F image=@{shlex.quote(image)} {api_url}/identify"
