"""Enroll images of an individual: decode, embed in one batch, store, commit, then index.

The response is sent only after the database commit, and the index is updated after it, so a crash
at any point leaves nothing acknowledged that a restart (which rebuilds indexes from the database)
would lose. Re-sending an image an individual already has stores nothing and is reported as
``created: false``; it also indexes any of the individual's stored vectors the index lacks (an
index add that failed after its commit).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Image, Individual
from service.db.repository import Repository
from service.errors import (
    ExternalIdConflict,
    ImageRejected,
    IndexUpdateFailed,
    IndividualNotFound,
    InvalidRequest,
    SpeciesMismatch,
    SpeciesUnavailable,
)
from service.image_store import ImageStore
from service.metrics import Metrics
from service.ml.gallery import GalleryEntry
from service.ml.images import DecodedImage, ImagePolicy, decode_images
from service.ml.index import as_unit_vectors
from service.ml.registry import Registry, Serving, SpeciesSlot
from service.schemas import EnrolledImage, EnrollResult
from service.security import Principal
from service.services.individuals import individual_public

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnrollCommand:
    species: str
    images: list[bytes]
    individual_id: uuid.UUID | None = None
    external_id: str | None = None
    name: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class EnrollOutcome:
    result: EnrollResult
    created_anything: bool


def enroll(
    session: Session,
    registry: Registry,
    store: ImageStore,
    metrics: Metrics,
    images: ImagePolicy,
    max_images: int,
    command: EnrollCommand,
    actor: Principal,
) -> EnrollOutcome:
    if not command.images:
        raise InvalidRequest("at least one image is required")
    if len(command.images) > max_images:
        raise InvalidRequest(f"at most {max_images} images per request", max_images=max_images)
    if command.individual_id is None and command.external_id is None:
        raise InvalidRequest("give individual_id (existing) or external_id (found or created)")
    slot = registry.slot(command.species)
    serving = slot.require_serving()
    decoded = decode_images(
        [(f"images[{i}]", data) for i, data in enumerate(command.images)],
        images,
        serving.embedder.card.preprocess.input_size,
    )
    unique = list({d.sha256: d for d in decoded}.values())
    repo = Repository(session)

    # Embed outside the lock, skipping images the individual already has (a retried request).
    known = _existing_individual(repo, command)
    already = repo.images_by_sha(known.id, [d.sha256 for d in unique]) if known else {}
    fresh = [d for d in unique if d.sha256 not in already]
    vectors = dict(
        zip(
            (d.sha256 for d in fresh), _embed(registry, serving, metrics, command.species, fresh), strict=True
        )
    )
    session.rollback()  # end the read transaction before waiting for the lock

    with slot.write_lock:
        current = slot.require_serving()
        if current is not serving:  # a new model was swapped in while this request embedded
            serving, vectors = current, {}
        try:
            return _commit(
                session, repo, registry, slot, serving, store, metrics, command, unique, vectors, actor
            )
        except IntegrityError:
            # Another process (a replica; the write lock is this process's) created the same animal
            # or stored the same photo of it meanwhile: look again, and join it.
            session.rollback()
            log.info("enroll of %s raced another process's; enrolling again", command.external_id)
            return _commit(
                session, repo, registry, slot, serving, store, metrics, command, unique, vectors, actor
            )


def _existing_individual(repo: Repository, command: EnrollCommand) -> Individual | None:
    species = repo.species_by_name(command.species)
    if species is None:
        raise SpeciesUnavailable(
            f"species {command.species!r} is not registered yet", species=command.species
        )
    if command.individual_id is not None:
        individual = repo.get_individual(command.individual_id)
        if individual is None:
            raise IndividualNotFound(
                f"no individual {command.individual_id}", individual_id=str(command.individual_id)
            )
        if individual.species_id != species.id:
            raise SpeciesMismatch(
                f"individual {command.individual_id} is not a {command.species}",
                individual_id=str(command.individual_id),
            )
        if command.external_id is not None and individual.external_id != command.external_id:
            raise ExternalIdConflict(
                "individual_id and external_id name different individuals",
                individual_id=str(command.individual_id),
                external_id=command.external_id,
            )
        return individual
    assert command.external_id is not None
    return repo.individual_by_external_id(species.id, command.external_id)


def _embed(
    registry: Registry, serving: Serving, metrics: Metrics, species: str, images: list[DecodedImage]
) -> np.ndarray:
    if not images:
        return np.empty((0, serving.embedder.dim), dtype=np.float32)
    with metrics.time_inference(species, "embed"):
        vectors = registry.embed(species, serving.embedder, [d.image for d in images])
    # Checked before anything commits: the index refuses these, and after the commit that would be
    # a 500 for an image that is stored but never found.
    for decoded, vector in zip(images, vectors, strict=True):
        try:
            as_unit_vectors(vector, serving.embedder.dim)
        except ValueError as exc:
            raise ImageRejected(
                f"model {serving.model_version} gives the image with sha256 {decoded.sha256} no usable "
                f"embedding: {exc}",
                sha256=decoded.sha256,
                model_version=serving.model_version,
            ) from exc
    return vectors


def _commit(
    session: Session,
    repo: Repository,
    registry: Registry,
    slot: SpeciesSlot,
    serving: Serving,
    store: ImageStore,
    metrics: Metrics,
    command: EnrollCommand,
    unique: list[DecodedImage],
    vectors: dict[str, np.ndarray],
    actor: Principal,
) -> EnrollOutcome:
    """Under the species write lock: rows and files, one commit, then the index."""
    # Looked up again: the individual may have been created, deleted or merged meanwhile.
    individual = _existing_individual(repo, command)
    created_individual = individual is None
    if individual is None:
        species = repo.species_by_name(command.species)
        assert species is not None
        individual = repo.create_individual(species.id, command.external_id, command.name, command.metadata)
    already = repo.images_by_sha(individual.id, [d.sha256 for d in unique])
    to_add = [d for d in unique if d.sha256 not in already]
    late = [d for d in to_add if d.sha256 not in vectors]  # rare: a delete or a model swap meanwhile
    vectors.update(
        zip((d.sha256 for d in late), _embed(registry, serving, metrics, slot.name, late), strict=True)
    )
    written: list[str] = []
    added: list[tuple[int, Image]] = []
    try:
        for decoded in to_add:
            image_id = uuid.uuid4()
            relative = store.relative_path(slot.name, image_id, decoded.extension)
            store.write(relative, decoded.data)  # before the row that points at it commits
            written.append(relative)
            image = repo.add_image(
                Image(
                    id=image_id,
                    individual_id=individual.id,
                    sha256=decoded.sha256,
                    storage_path=relative,
                    size_bytes=len(decoded.data),
                    width=decoded.width,
                    height=decoded.height,
                    format=decoded.format,
                )
            )
            embedding = repo.add_embedding(image.id, serving.model_version_id, vectors[decoded.sha256])
            added.append((embedding.id, image))
            already[decoded.sha256] = image
        if added or created_individual:
            repo.audit(
                "enroll",
                slot.name,
                actor.fingerprint,
                individual.id,
                {
                    "images": [str(image.id) for _, image in added],
                    "individual_created": created_individual,
                    "model_version": serving.model_version,
                },
            )
        repo.record_index_change(slot.name, [emb_id for emb_id, _ in added])  # other replicas follow
        session.flush()
        # The answer's animal as this commit leaves it: a delete through another replica, waiting
        # on its row, may remove it the moment this commits.
        row = repo.individual_row(individual.id)
        assert row is not None
        session.commit()
    except BaseException:
        session.rollback()
        for relative in written:
            store.delete(relative)
        raise
    if added:
        try:
            serving.gallery.add(
                [emb_id for emb_id, _ in added],
                np.stack([vectors[image.sha256] for _, image in added]),
                [GalleryEntry(image_id=image.id, individual_id=individual.id) for _, image in added],
            )
        except Exception as exc:  # e.g. the GPU mirror out of memory; the index is left unchanged
            log.exception("index add failed after the commit of individual %s", individual.id)
            raise IndexUpdateFailed(
                "the images are stored but the search index could not take their vectors; "
                "send the same request again to index them",
                individual_id=str(individual.id),
            ) from exc
    if len(to_add) < len(unique):
        _index_missing(repo, serving, individual.id)
    session.commit()
    created = {image.sha256 for _, image in added}
    images = [
        EnrolledImage(
            image_id=already[d.sha256].id,
            sha256=d.sha256,
            created=d.sha256 in created,
            width=already[d.sha256].width,
            height=already[d.sha256].height,
        )
        for d in unique
    ]
    return EnrollOutcome(
        result=EnrollResult(
            individual=individual_public(row),
            individual_created=created_individual,
            images=images,
            model_version=serving.model_version,
        ),
        created_anything=bool(added) or created_individual,
    )


def _index_missing(repo: Repository, serving: Serving, individual_id: uuid.UUID) -> None:
    """Index the individual's stored vectors that the index lacks.

    An index add that failed after its commit answered 503 index_update_failed for a durable enroll;
    the client's retry is a no-op for the database, and this is where the missing vectors become
    searchable.
    """
    missing = [
        row
        for row in repo.individual_embeddings(individual_id, serving.model_version_id)
        if row[0] not in serving.gallery
    ]
    if not missing:
        return
    log.warning("indexing %d stored vectors of individual %s the index lacked", len(missing), individual_id)
    serving.gallery.add(
        [embedding_id for embedding_id, _, _ in missing],
        np.stack([vector for _, _, vector in missing]),
        [GalleryEntry(image_id=image_id, individual_id=individual_id) for _, image_id, _ in missing],
    )
