"""Does the served card's open-set table hold for this deployment's own animals?

Each enrolled animal of a species is left out in turn and its stored vectors asked against the rest
(:func:`training.open_set.herd_check`): the share of them that would be answered ``match`` at the
card's threshold for this gallery, per target FPIR, and the threshold that would hold the target.
Animals of one herd are harder strangers than those a card is calibrated on (docs/results.md, "The
herd as its own strangers"); when the share is well above the target, recalibrate the card on the
gallery (`animalid gallery export`, then `animalid calibrate`). The stored vectors are read a block
at a time: memory holds the gallery's layout (ids), the photos asked and one block, for any size.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from service.db.repository import Repository, vector_from_bytes
from service.errors import InvalidRequest, SpeciesNotFound
from training.artifact import ArtifactError, read_card
from training.open_set import HerdMates, herd_check


@dataclass(frozen=True)
class HerdCheck:
    species: str
    model_version: str
    images: int
    individuals: int
    size: int  # the gallery as the card's table reads it
    rows: list[HerdMates]


def check_herd(session: Session, models_dir: Path, species: str, max_queries: int) -> HerdCheck:
    """The herd check of ``species``' active model version, with its card from ``models_dir``."""
    repo = Repository(session)
    found = repo.species_by_name(species)
    if found is None:
        raise SpeciesNotFound(f"unknown species {species!r}", species=species)
    try:
        card = read_card(models_dir / species)
    except ArtifactError as exc:
        raise InvalidRequest(f"no model card for {species!r}: {exc}", species=species) from exc
    active = repo.active_version(found.id)
    if active is None or active.version != card.model_version:
        raise InvalidRequest(
            f"the stored vectors are of {active.version if active else 'no model'}, the models folder's "
            f"card of {card.model_version}: check once the service has switched to it",
            species=species,
        )
    if card.open_set is None:
        raise InvalidRequest(f"the model card of {species!r} has no open-set table", species=species)
    layout = read_layout(repo, active.id)
    if len(layout.individuals) < 2:
        raise InvalidRequest(f"species {species!r} has fewer than two enrolled individuals", species=species)

    def vectors_of(asked: np.ndarray) -> np.ndarray:
        rows = repo.gallery_rows(layout.embedding_ids[asked].tolist(), active.id)
        if len(rows) != len(asked):
            raise InvalidRequest(
                f"photos of {species!r} were deleted while the check read them: run it again", species=species
            )
        return np.stack([vector_from_bytes(row.vector) for row in rows])

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Animals enrolled since the layout was read are other animals to every photo asked.
        for chunk in repo.iter_gallery(active.id):
            yield (
                np.stack([vector_from_bytes(row.vector) for row in chunk]),
                np.array([layout.individuals.get(row.individual_id, -1) for row in chunk], dtype=np.int64),
            )

    size, checks = herd_check(layout.code, vectors_of, blocks, card.open_set, max_queries=max_queries)
    return HerdCheck(species, card.model_version, len(layout.code), len(layout.individuals), size, checks)


@dataclass(frozen=True)
class GalleryLayout:
    """A gallery without its vectors: per stored vector in id order, its id and its individual's number."""

    embedding_ids: np.ndarray
    code: np.ndarray
    individuals: dict[uuid.UUID, int]  # numbered in herd_mates' order: their ids as text, sorted


def read_layout(repo: Repository, model_version_id: int) -> GalleryLayout:
    """The layout, a chunk at a time into arrays: individuals numbered as first seen, then again."""
    first_seen: dict[uuid.UUID, int] = {}
    ids, seen = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for chunk in repo.iter_gallery_owners(model_version_id):
        ids.append(np.fromiter((eid for eid, _ in chunk), np.int64, len(chunk)))
        seen.append(
            np.fromiter(
                (first_seen.setdefault(who, len(first_seen)) for _, who in chunk), np.int64, len(chunk)
            )
        )
    names = sorted(first_seen, key=str)
    renumber = np.empty(len(names), dtype=np.int64)
    renumber[[first_seen[who] for who in names]] = np.arange(len(names))
    return GalleryLayout(
        np.concatenate(ids), renumber[np.concatenate(seen)], {who: i for i, who in enumerate(names)}
    )
