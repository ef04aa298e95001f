"""Does the served card's open-set table hold for this deployment's own animals?

Each enrolled animal of a species is left out in turn and its stored vectors asked against the rest
(:func:`training.open_set.herd_check`): the share of them that would be answered ``match`` at the
card's threshold for this gallery, per target FPIR, and the threshold that would hold the target.
Animals of one herd are harder strangers than those a card is calibrated on (docs/results.md, "The
herd as its own strangers"). :func:`keep_in_card` writes a check into the served card, and every API
process then raises its thresholds where the herd needs it (:class:`training.open_set.HerdCalibration`);
the worker does so by itself as a gallery grows (:func:`due`). The stored vectors are read a block
at a time: memory holds the gallery's layout (ids), the photos asked and one block, for any size.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service.db.repository import Repository, vector_from_bytes
from service.errors import InvalidRequest, SpeciesNotFound
from training.artifact import ArtifactError, read_card, write_card
from training.open_set import HERD_TARGETS, HerdCalibration, HerdMates, OpenSetCalibration, herd_check


@dataclass(frozen=True)
class HerdCheck:
    species: str
    model_version: str
    images: int
    individuals: int
    size: int  # the gallery as the card's table reads it
    rows: list[HerdMates]
    table: OpenSetCalibration  # the card's, the rows' thresholds are read from


def check_targets(target_fpir: float) -> tuple[float, ...]:
    """The targets a check reports: the usual ones and the species' own."""
    return tuple(sorted({*HERD_TARGETS, target_fpir}))


def check_herd(
    session: Session,
    models_dir: Path,
    species: str,
    max_queries: int,
    targets: Sequence[float] = HERD_TARGETS,
) -> HerdCheck:
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

    size, checks = herd_check(layout.code, vectors_of, blocks, card.open_set, targets, max_queries)
    return HerdCheck(
        species, card.model_version, len(layout.code), len(layout.individuals), size, checks, card.open_set
    )


def keep_in_card(models_dir: Path, check: HerdCheck) -> HerdCalibration:
    """Write ``check`` into the species' card in the models folder (same weights; in place, as
    `animalid calibrate` does), which every API process serves within ``ANIMALID_MODEL_WATCH_S``
    seconds without re-embedding. Refused when the card is no longer the one checked."""
    folder = models_dir / check.species
    card = read_card(folder)
    table = card.open_set.to_dict() if card.open_set is not None else None
    if card.model_version != check.model_version or table != check.table.to_dict():
        raise InvalidRequest(
            f"the models folder's card of {check.species!r} changed while its herd was checked "
            f"({card.model_version} now, {check.model_version} checked): check again",
            species=check.species,
        )
    herd = HerdCalibration(
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        images=check.images,
        individuals=check.individuals,
        size=check.size,
        rows=tuple(check.rows),
    )
    write_card(replace(card, herd=herd), folder)
    return herd


def due(
    session: Session, models_dir: Path, species: str, growth: float, min_individuals: int, target_fpir: float
) -> bool:
    """Whether the worker should check ``species``' herd now: it serves (its stored vectors are of
    the card's version) a card with an open-set table, has at least ``min_individuals`` enrolled,
    and has never been checked with this card, nor at ``target_fpir``, or holds ``growth`` more
    images than when it was."""
    repo = Repository(session)
    found = repo.species_by_name(species)
    if found is None or growth <= 0:
        return False
    try:
        card = read_card(models_dir / species)
    except ArtifactError:
        return False
    active = repo.active_version(found.id)
    if card.open_set is None or active is None or active.version != card.model_version:
        return False
    if repo.count_individuals(found.id) < max(min_individuals, 2):
        return False
    return (
        card.herd is None
        or card.herd.row_for(target_fpir) is None
        or repo.count_images(found.id) >= card.herd.images * (1 + growth)
    )


def describe(check: HerdCheck) -> dict[str, Any]:
    """The check as the CLI prints it and a job keeps it (figures to 4 decimals)."""
    return {
        "species": check.species,
        "model_version": check.model_version,
        "images": check.images,
        "individuals": check.individuals,
        "size_read": check.size,
        "targets": [
            {key: _rounded(value) for key, value in row.to_dict().items()}
            | {"raises_threshold_by": round(row.excess, 4)}
            for row in check.rows
        ],
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


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


def check_and_keep(
    session: Session, models_dir: Path, species: str, max_queries: int, target_fpir: float, actor: str
) -> dict[str, Any]:
    """Check ``species``' herd at the usual targets and ``target_fpir``, keep the check in its card
    (:func:`keep_in_card`) and audit it. Returns :func:`describe`'s figures and when it was kept."""
    check = check_herd(session, models_dir, species, max_queries, check_targets(target_fpir))
    herd = keep_in_card(models_dir, check)
    figures = describe(check) | {"checked_at": herd.checked_at}
    Repository(session).audit("herd_check", species, actor[:64], None, figures)
    session.commit()
    return figures
