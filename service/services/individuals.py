"""Individuals and their images: list, read, update, delete (with their vectors), merge."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from service.db.models import Image
from service.db.repository import IndividualRow, Repository
from service.errors import ImageNotFound, IndividualNotFound, InvalidRequest, SpeciesMismatch
from service.image_store import ImageStore
from service.ml.registry import Registry, SpeciesSlot
from service.schemas import (
    DeleteResult,
    ImagePublic,
    ImagesPublic,
    IndividualPublic,
    IndividualsPublic,
    IndividualUpdate,
    MergeResult,
)
from service.security import Principal
from training.preprocess import image_format

log = logging.getLogger(__name__)


def individual_public(row: IndividualRow) -> IndividualPublic:
    ind = row.individual
    return IndividualPublic(
        id=ind.id,
        species=row.species,
        external_id=ind.external_id,
        name=ind.name,
        metadata=dict(ind.metadata_ or {}),
        image_count=row.image_count,
        created_at=ind.created_at,
        updated_at=ind.updated_at,
    )


def image_public(image: Image) -> ImagePublic:
    return ImagePublic(
        id=image.id,
        individual_id=image.individual_id,
        sha256=image.sha256,
        size_bytes=image.size_bytes,
        width=image.width,
        height=image.height,
        format=image.format,
        created_at=image.created_at,
    )


@dataclass(frozen=True)
class Page:
    offset: int
    limit: int


def list_individuals(
    session: Session, registry: Registry, species: str | None, external_id: str | None, page: Page
) -> IndividualsPublic:
    repo = Repository(session)
    species_id = None
    if species is not None:
        registry.slot(species)  # unknown species: 404 rather than an empty page
        row = repo.species_by_name(species)
        if row is None:
            return IndividualsPublic(data=[], count=0, offset=page.offset, limit=page.limit)
        species_id = row.id
    rows, total = repo.list_individuals(species_id, external_id, page.offset, page.limit)
    return IndividualsPublic(
        data=[individual_public(r) for r in rows], count=total, offset=page.offset, limit=page.limit
    )


def _not_found(individual_id: uuid.UUID) -> IndividualNotFound:
    return IndividualNotFound(f"no individual {individual_id}", individual_id=str(individual_id))


def _row(repo: Repository, individual_id: uuid.UUID) -> IndividualRow:
    row = repo.individual_row(individual_id)
    if row is None:
        raise _not_found(individual_id)
    return row


def get_individual(session: Session, individual_id: uuid.UUID) -> IndividualPublic:
    return individual_public(_row(Repository(session), individual_id))


def update_individual(
    session: Session, individual_id: uuid.UUID, update: IndividualUpdate, actor: Principal
) -> IndividualPublic:
    repo = Repository(session)
    row = _row(repo, individual_id)
    changes = update.model_dump(exclude_unset=True)
    if not changes:
        raise InvalidRequest("nothing to update: give name and/or metadata")
    individual = row.individual
    if "name" in changes:
        individual.name = changes["name"]
    if "metadata" in changes:
        individual.metadata_ = changes["metadata"] or {}
    repo.audit("update", row.species, actor.fingerprint, individual.id, {"fields": sorted(changes)})
    try:
        session.flush()
        # A delete or merge may have committed since the read above. An UPDATE of the gone row
        # raises StaleDataError; an unchanged value sends no UPDATE, so read the row again.
        updated = _row(repo, individual_id)
    except (StaleDataError, IndividualNotFound):
        session.rollback()  # the audit entry with it
        raise _not_found(individual_id) from None
    public = individual_public(updated)
    session.commit()
    return public


def _get_or_add_slot(registry: Registry, species: str) -> SpeciesSlot:
    """The species' slot, added as a disabled one when the registry lacks it (a species known only
    to the database). Its write lock guards the species' rows and index."""
    slot = registry.slots.get(species)
    if slot is None:
        slot = registry.slots.setdefault(
            species, SpeciesSlot(name=species, disabled_reason="no model artifact")
        )
    return slot


def _indexed_embedding_ids(slot: SpeciesSlot, repo: Repository, image_ids: list[uuid.UUID]) -> list[int]:
    """Embedding ids of these images in the serving index, read before their rows go or move."""
    if slot.serving is None:
        return []
    return list(repo.embedding_ids(image_ids, slot.serving.model_version_id).values())


def delete_individual(
    session: Session, registry: Registry, store: ImageStore, individual_id: uuid.UUID, actor: Principal
) -> DeleteResult:
    repo = Repository(session)
    species = _row(repo, individual_id).species
    slot = _get_or_add_slot(registry, species)
    with slot.write_lock:
        session.rollback()
        repo.lock_individuals([individual_id])
        row = _row(repo, individual_id)
        images = repo.images_of(individual_id)
        image_ids = [image.id for image in images]
        embedding_ids = _indexed_embedding_ids(slot, repo, image_ids)
        files = [image.storage_path for image in images]
        repo.delete_images(image_ids)
        repo.delete_individual(row.individual)
        repo.audit(
            "delete_individual",
            species,
            actor.fingerprint,
            individual_id,
            {
                "external_id": row.individual.external_id,
                "name": row.individual.name,
                "images": [str(i) for i in image_ids],
            },
        )
        repo.record_index_change(species, embedding_ids)  # other replicas follow
        session.commit()
        if slot.serving is not None:
            slot.serving.gallery.remove(embedding_ids)
    _delete_files(store, files)
    return DeleteResult(id=individual_id, deleted_images=len(image_ids))


def list_images(session: Session, individual_id: uuid.UUID, page: Page) -> ImagesPublic:
    repo = Repository(session)
    _row(repo, individual_id)
    images, total = repo.list_images(individual_id, page.offset, page.limit)
    return ImagesPublic(
        data=[image_public(i) for i in images], count=total, offset=page.offset, limit=page.limit
    )


def _image_of(repo: Repository, individual_id: uuid.UUID, image_id: uuid.UUID) -> Image:
    _row(repo, individual_id)
    image = repo.get_image(image_id)
    if image is None or image.individual_id != individual_id:
        raise ImageNotFound(
            f"individual {individual_id} has no image {image_id}",
            individual_id=str(individual_id),
            image_id=str(image_id),
        )
    return image


def get_image(session: Session, individual_id: uuid.UUID, image_id: uuid.UUID) -> ImagePublic:
    return image_public(_image_of(Repository(session), individual_id, image_id))


def image_file(
    session: Session, store: ImageStore, individual_id: uuid.UUID, image_id: uuid.UUID
) -> tuple[Path, str]:
    """Path of the stored original and its media type."""
    image = _image_of(Repository(session), individual_id, image_id)
    path = store.absolute(image.storage_path)
    if not path.is_file():
        raise ImageNotFound(f"the stored file of image {image_id} is missing", image_id=str(image_id))
    return path, image_format(image.format).media_type


def delete_image(
    session: Session,
    registry: Registry,
    store: ImageStore,
    individual_id: uuid.UUID,
    image_id: uuid.UUID,
    actor: Principal,
) -> ImagePublic:
    repo = Repository(session)
    species = _row(repo, individual_id).species
    slot = _get_or_add_slot(registry, species)
    with slot.write_lock:
        session.rollback()
        repo.lock_individuals([individual_id])
        image = _image_of(repo, individual_id, image_id)
        public = image_public(image)
        embedding_ids = _indexed_embedding_ids(slot, repo, [image.id])
        repo.delete_images([image.id])
        repo.audit("delete_image", species, actor.fingerprint, individual_id, {"image": str(image_id)})
        repo.record_index_change(species, embedding_ids)  # other replicas follow
        session.commit()
        if slot.serving is not None:
            slot.serving.gallery.remove(embedding_ids)
    _delete_files(store, [image.storage_path])
    return public


def merge(
    session: Session,
    registry: Registry,
    store: ImageStore,
    target_id: uuid.UUID,
    source_id: uuid.UUID,
    actor: Principal,
) -> MergeResult:
    """Move the source's images to the target, then delete the source.

    An image the target already has (same bytes) is dropped rather than duplicated.
    """
    repo = Repository(session)
    if target_id == source_id:  # nothing to move; the schema cannot forbid it, so it is a no-op
        target = _row(repo, target_id)
        repo.audit(
            "merge", target.species, actor.fingerprint, target_id, {"source_id": str(source_id), "noop": True}
        )
        session.commit()
        return MergeResult(
            individual=individual_public(target),
            source_id=source_id,
            moved_images=0,
            duplicate_images_dropped=0,
        )
    target_species = _row(repo, target_id).species
    slot = _get_or_add_slot(registry, target_species)
    with slot.write_lock:
        session.rollback()
        repo.lock_individuals([target_id, source_id])
        target, source = _row(repo, target_id), _row(repo, source_id)
        if source.species != target.species:
            raise SpeciesMismatch(
                f"cannot merge a {source.species} into a {target.species}",
                individual_id=str(target_id),
                source_id=str(source_id),
            )
        source_images = repo.images_of(source_id)
        target_shas = set(repo.images_by_sha(target_id, [i.sha256 for i in source_images]))
        duplicates = [i for i in source_images if i.sha256 in target_shas]
        moved = [i for i in source_images if i.sha256 not in target_shas]
        dropped_vectors = _indexed_embedding_ids(slot, repo, [i.id for i in duplicates])
        moved_vectors = _indexed_embedding_ids(slot, repo, [i.id for i in moved])
        files = [i.storage_path for i in duplicates]
        repo.delete_images([i.id for i in duplicates])
        repo.move_images([i.id for i in moved], target_id)
        repo.audit(
            "merge",
            target.species,
            actor.fingerprint,
            target_id,
            {
                "source_id": str(source_id),
                "source_external_id": source.individual.external_id,
                "source_name": source.individual.name,
                "source_metadata": dict(source.individual.metadata_ or {}),
                "moved_images": [str(i.id) for i in moved],
                "dropped_duplicate_images": [str(i.id) for i in duplicates],
            },
        )
        session.flush()
        repo.delete_individual(source.individual)
        repo.record_index_change(target.species, [*dropped_vectors, *moved_vectors])  # other replicas follow
        # The target as this commit leaves it: a delete through another replica, waiting on its
        # row, may remove it the moment this commits.
        merged = individual_public(_row(repo, target_id))
        session.commit()
        if slot.serving is not None:
            slot.serving.gallery.remove(dropped_vectors)
            slot.serving.gallery.reassign(moved_vectors, target_id)
    _delete_files(store, files)
    return MergeResult(
        individual=merged,
        source_id=source_id,
        moved_images=len(moved),
        duplicate_images_dropped=len(duplicates),
    )


def _delete_files(store: ImageStore, files: list[str]) -> None:
    """After the commit: a crash before this leaves orphan files, never rows without files."""
    for relative in files:
        try:
            store.delete(relative)
        except OSError:
            log.warning("could not delete stored image %s", relative, exc_info=True)
