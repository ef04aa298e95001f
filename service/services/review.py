"""The review queue: identify answers marked ``uncertain`` kept for a person to decide.

Opt-in per deployment (``ANIMALID_REVIEW_QUEUE``). An item holds the photo (in the image store, under
``_review/<species>/``) and the answer's candidates. An admin resolves it once: ``confirm`` enrols
the photo to an existing individual, ``new_individual`` enrols it as a new one, ``reject`` enrols
nothing. Each resolution is written to the audit log; the queue's copy of the photo is then deleted
(an enrolled photo has its own copy).
"""

from __future__ import annotations

import logging
import mimetypes
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from sqlalchemy.orm import Session

from service.db.claims import Claim
from service.db.models import ReviewItem, ReviewStatus, utcnow
from service.db.repository import Repository
from service.db.reviews import ReviewRepository
from service.errors import (
    ExternalIdConflict,
    ImageNotFound,
    InvalidRequest,
    ReviewAlreadyResolved,
    ReviewInProgress,
    ReviewNotFound,
    SpeciesUnavailable,
)
from service.image_store import ImageStore, ImageStoreError
from service.metrics import Metrics
from service.ml.images import DecodedImage, ImagePolicy
from service.ml.registry import Registry
from service.schemas import (
    CandidatePublic,
    IdentifyResult,
    ReviewItemPublic,
    ReviewItemsPublic,
    ReviewResolve,
)
from service.security import Principal
from service.services import enrollment
from service.services.individuals import Page

log = logging.getLogger(__name__)

REVIEW_FOLDER = "_review"
STATUS_OF = {
    "confirm": ReviewStatus.CONFIRMED,
    "new_individual": ReviewStatus.NEW_INDIVIDUAL,
    "reject": ReviewStatus.REJECTED,
}


def keep(session: Session, store: ImageStore, image: DecodedImage, answer: IdentifyResult) -> uuid.UUID:
    """Store the photo and the answer as a pending item; its id."""
    species = Repository(session).species_by_name(answer.species)
    if species is None:
        raise SpeciesUnavailable(f"species {answer.species!r} is not registered yet", species=answer.species)
    item_id = uuid.uuid4()
    relative = store.relative_path(f"{REVIEW_FOLDER}/{answer.species}", item_id, image.extension)
    store.write(relative, image.data)
    try:
        ReviewRepository(session).add(
            ReviewItem(
                id=item_id,
                species_id=species.id,
                status=ReviewStatus.PENDING,
                storage_path=relative,
                sha256=image.sha256,
                model_version=answer.model_version,
                candidates=[c.model_dump(mode="json") for c in answer.candidates],
                similarity=answer.candidates[0].similarity,
                confidence=answer.confidence,
                threshold=answer.threshold,
                gallery_size=answer.gallery_size,
            )
        )
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(relative)
        raise
    return item_id


def item_public(item: ReviewItem, species: str) -> ReviewItemPublic:
    return ReviewItemPublic(
        id=item.id,
        species=species,
        status=item.status,  # type: ignore[arg-type]
        model_version=item.model_version,
        candidates=[CandidatePublic.model_validate(c) for c in item.candidates],
        similarity=item.similarity,
        confidence=item.confidence,
        threshold=item.threshold,
        gallery_size=item.gallery_size,
        image_sha256=item.sha256,
        created_at=item.created_at,
        resolved_at=item.resolved_at,
        resolved_by=item.resolved_by,
        individual_id=item.individual_id,
        image_id=item.image_id,
    )


def _get(session: Session, review_id: uuid.UUID) -> tuple[ReviewItem, str]:
    found = ReviewRepository(session).get(review_id)
    if found is None:
        raise ReviewNotFound(f"no review item {review_id}", review_id=str(review_id))
    return found


def list_items(
    session: Session, registry: Registry, species: str | None, status: str | None, page: Page
) -> ReviewItemsPublic:
    if species is not None:
        registry.slot(species)  # unknown species: 404 rather than an empty page
    rows, total = ReviewRepository(session).list(species, status, page.offset, page.limit)
    return ReviewItemsPublic(
        data=[item_public(item, name) for item, name in rows],
        count=total,
        offset=page.offset,
        limit=page.limit,
    )


def get_item(session: Session, review_id: uuid.UUID) -> ReviewItemPublic:
    return item_public(*_get(session, review_id))


def photo(session: Session, store: ImageStore, review_id: uuid.UUID) -> tuple[bytes, str]:
    """The kept photo and its media type (gone once the item is resolved)."""
    item, _ = _get(session, review_id)
    session.rollback()
    try:
        data = store.read(item.storage_path)
    except ImageStoreError as exc:
        raise ImageNotFound(
            f"review item {review_id} no longer keeps its photo (status {item.status})",
            review_id=str(review_id),
            status=item.status,
        ) from exc
    return data, mimetypes.guess_type(item.storage_path)[0] or "application/octet-stream"


def resolve(
    session: Session,
    registry: Registry,
    store: ImageStore,
    metrics: Metrics,
    images: ImagePolicy,
    review_id: uuid.UUID,
    decision: ReviewResolve,
    actor: Principal,
) -> ReviewItemPublic:
    _, species = _get(session, review_id)
    command = _enroll_command(session, species, decision)
    # One resolution of an item across API processes (its claim), and one at a time per species in
    # this one (the species' write lock, re-entered by enrolment).
    with _claimed(session, review_id), registry.slot(species).write_lock:
        session.rollback()
        item, species = _get(session, review_id)
        if item.status != ReviewStatus.PENDING:
            raise ReviewAlreadyResolved(
                f"review item {review_id} is already resolved ({item.status})",
                review_id=str(review_id),
                status=item.status,
            )
        individual_id = image_id = None
        if command is not None:
            data = store.read(item.storage_path)
            session.rollback()
            command = replace(command, images=[data])
            outcome = enrollment.enroll(session, registry, store, metrics, images, 1, command, actor)
            individual_id, image_id = outcome.result.individual.id, outcome.result.images[0].image_id
            item, species = _get(session, review_id)
        item.status = STATUS_OF[decision.action]
        item.resolved_at = utcnow()
        item.resolved_by = actor.fingerprint
        item.individual_id, item.image_id = individual_id, image_id
        Repository(session).audit(
            f"review_{decision.action}",
            species,
            actor.fingerprint,
            individual_id,
            {"review": str(review_id), "image": None if image_id is None else str(image_id)},
        )
        session.commit()
        kept = item.storage_path
        result = item_public(item, species)
    store.delete(kept)
    return result


@contextmanager
def _claimed(session: Session, review_id: uuid.UUID) -> Iterator[None]:
    """Hold the item's claim (another API process resolving it meanwhile: 409)."""
    claim = Claim(session.get_bind().engine, "review", review_id)
    try:
        if not claim.try_take():
            raise ReviewInProgress(
                f"review item {review_id} is being resolved by another request", review_id=str(review_id)
            )
        yield
    finally:
        claim.release()


def _enroll_command(
    session: Session, species: str, decision: ReviewResolve
) -> enrollment.EnrollCommand | None:
    """What the decision enrols (None for reject), checked before anything changes."""
    if decision.action == "reject":
        return None
    if decision.action == "confirm":
        if decision.individual_id is None:
            raise InvalidRequest("confirm needs individual_id: the individual the photo shows")
        return enrollment.EnrollCommand(species=species, images=[], individual_id=decision.individual_id)
    if decision.external_id is None:
        raise InvalidRequest("new_individual needs external_id: the new individual's id")
    repo = Repository(session)
    row = repo.species_by_name(species)
    if row is not None and repo.individual_by_external_id(row.id, decision.external_id) is not None:
        raise ExternalIdConflict(
            f"an individual {decision.external_id!r} already exists; confirm the photo as it instead",
            external_id=decision.external_id,
        )
    return enrollment.EnrollCommand(
        species=species, images=[], external_id=decision.external_id, name=decision.name
    )
