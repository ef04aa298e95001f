"""Does the served card's open-set table hold for this deployment's own animals?

Each enrolled animal of a species is left out in turn and its stored vectors asked against the rest
(:func:`training.open_set.herd_mates`): the share of them that would be answered ``match`` at the
card's threshold for this gallery, per target FPIR, and the threshold that would hold the target.
Animals of one herd are harder strangers than those a card is calibrated on (docs/results.md, "The
herd as its own strangers"); when the share is well above the target, recalibrate the card on the
gallery (`animalid gallery export`, then `animalid calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from service.db.repository import Repository, vector_from_bytes
from service.errors import InvalidRequest, SpeciesNotFound
from training.artifact import ArtifactError, read_card
from training.open_set import HerdMates, herd_mates


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
    rows = [row for chunk in repo.iter_gallery(active.id) for row in chunk]
    individuals = [str(row.individual_id) for row in rows]
    if len(set(individuals)) < 2:
        raise InvalidRequest(f"species {species!r} has fewer than two enrolled individuals", species=species)
    emb = np.stack([vector_from_bytes(row.vector) for row in rows])
    size, checks = herd_mates(emb, individuals, card.open_set, max_queries=max_queries)
    return HerdCheck(species, card.model_version, len(rows), len(set(individuals)), size, checks)
