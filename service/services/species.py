"""Species lifecycle (start-up, reload after a model change), descriptions and readiness."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service.db.repository import Repository
from service.errors import SpeciesNotFound
from service.ml.embedder import Embedder
from service.ml.registry import Pending, Registry, Serving, SpeciesSlot, SpeciesStatus
from service.schemas import (
    CheckName,
    IdentifyPoint,
    ReloadResult,
    SpeciesPublic,
    SpeciesReadiness,
    StatusResult,
)
from service.security import Principal
from service.services.galleries import build_gallery, discover_artifacts, load_embedder
from service.services.identification import Limits, effective_threshold, gallery_images, operating_point
from service.services.reembedding import Reembedder
from training.artifact import ArtifactError

log = logging.getLogger(__name__)

# What an open or read-scoped answer says of an artifact that does not load; the error itself
# (paths, hashes) goes to the log and the admin status.
UNLOADABLE = "the model artifact could not be loaded"


@dataclass(frozen=True)
class Lifecycle:
    """What loading and swapping species needs."""

    sessions: sessionmaker[Session]
    registry: Registry
    reembedder: Reembedder
    models_dir: Path
    warmup: bool
    trace_forward: bool
    default_threshold: float


def load_all(life: Lifecycle) -> None:
    """Start-up: every artifact in the models folder, plus species known only to the database."""
    for name, path in discover_artifacts(life.models_dir).items():
        slot = life.registry.slots.setdefault(name, SpeciesSlot(name=name))
        slot.artifact_path = path
        _load_slot(life, slot)
    with life.sessions() as session:
        for species in Repository(session).all_species():
            if species.name not in life.registry.slots:
                life.registry.slots[species.name] = SpeciesSlot(
                    name=species.name,
                    disabled_reason="no model artifact",
                    disabled_detail=f"no model artifact at {life.models_dir / species.name}",
                )


def _load_embedder(life: Lifecycle, species: str, path: Path) -> Embedder:
    """One artifact, loaded and warmed up as the lifecycle's settings say."""
    registry = life.registry
    return load_embedder(
        species, path, registry.device, life.warmup, registry.speedup_batch, life.trace_forward
    )


def _load_slot(life: Lifecycle, slot: SpeciesSlot) -> str:
    assert slot.artifact_path is not None
    try:
        embedder = _load_embedder(life, slot.name, slot.artifact_path)
    except (ArtifactError, OSError) as exc:
        log.error("species %s disabled: %s", slot.name, exc)
        if slot.serving is None:
            slot.disable(UNLOADABLE, str(exc))
            return f"not loaded: {exc}"
        return f"not loaded, the current model keeps serving: {exc}"
    return _activate(life, slot, embedder)


def _activate(life: Lifecycle, slot: SpeciesSlot, embedder: Embedder) -> str:
    """Serve ``embedder`` now when the database already holds its vectors, else re-embed first."""
    species_id, version_id = _register(life, slot.name, embedder)
    if _active_version_id(life, species_id) == version_id:
        with slot.write_lock:
            # Asked again under the lock: a re-embedding job may have activated its own version,
            # dropping this one's vectors, while this call waited for it. Built under the lock: an
            # enroll committing meanwhile must land in this index.
            if _active_version_id(life, species_id) == version_id:
                gallery = build_gallery(
                    life.sessions,
                    version_id,
                    embedder.dim,
                    life.registry.use_gpu_index,
                    life.registry.index_plan,
                )
                slot.serving = Serving(embedder, gallery, version_id)
                slot.pending = None
                slot.disable(None)
                log.info(
                    "species %s serves %s with %d vectors", slot.name, embedder.model_version, len(gallery)
                )
                return f"serving {embedder.model_version} with {len(gallery)} vectors"
    with life.sessions() as session:
        images = Repository(session).count_images(species_id)
    life.reembedder.start(slot, Pending(embedder=embedder, model_version_id=version_id, total=images))
    if slot.serving is None:
        log.warning(
            "species %s: model %s needs %d stored images re-embedded and no older model is loaded to serve "
            "meanwhile",
            slot.name,
            embedder.model_version,
            images,
        )
        return f"re-embedding {images} images; the species serves once that is done"
    return f"re-embedding {images} images in the background; the current model serves meanwhile"


def _register(life: Lifecycle, name: str, embedder: Embedder) -> tuple[int, int]:
    """(species id, model version id) of ``embedder``, recorded if new. The first model of a species
    with no images is active at once: it has nothing to re-embed."""
    card = embedder.card
    with life.sessions() as session:
        repo = Repository(session)
        species = repo.ensure_species(name)
        version = repo.ensure_model_version(
            species.id,
            embedder.model_version,
            embedder.dim,
            card.preprocess.version,
            card.threshold,
            card.to_dict(),
        )
        if repo.active_version(species.id) is None and repo.count_images(species.id) == 0:
            repo.activate_version(species.id, version.id)
        session.commit()
        return species.id, version.id


def _active_version_id(life: Lifecycle, species_id: int) -> int | None:
    with life.sessions() as session:
        active = Repository(session).active_version(species_id)
        return active.id if active else None


def reload_species(life: Lifecycle, name: str, actor: Principal) -> ReloadResult:
    """Re-read ``<models_dir>/<name>/``; a new model version is re-embedded and swapped in. Audited."""
    slot = life.registry.slots.get(name)
    path = life.models_dir / name
    if slot is None:
        if not path.is_dir():
            raise SpeciesNotFound(f"unknown species {name!r}", species=name)
        slot = life.registry.slots.setdefault(name, SpeciesSlot(name=name))
    slot.artifact_path = path
    serving = slot.serving
    pending = slot.pending
    if not path.is_dir():
        message = f"no artifact at {path}; nothing changed"
    else:
        try:
            embedder = _load_embedder(life, name, path)
        except (ArtifactError, OSError) as exc:
            log.error("species %s: reload failed: %s", name, exc)
            if serving is None:
                slot.disable(UNLOADABLE, str(exc))
            message = f"not loaded: {exc}"
        else:
            if serving is not None and serving.model_version == embedder.model_version and pending is None:
                slot.disable(None)  # a failed switch to another model no longer applies
                message = f"{embedder.model_version} is already serving"
                if embedder.card.to_dict() != serving.embedder.card.to_dict():
                    # The same weights with another card (recalibrated in place, `animalid
                    # calibrate`): its vectors stay valid; only the thresholds and tables change.
                    with slot.write_lock:
                        if slot.serving is serving:
                            slot.serving = Serving(embedder, serving.gallery, serving.model_version_id)
                    message += "; its model card changed and is now served"
            elif pending is not None and pending.embedder.model_version == embedder.model_version:
                message = f"{embedder.model_version} is already being re-embedded"
            else:
                message = _activate(life, slot, embedder)
    result = ReloadResult(
        species=name,
        status=slot.status.value,
        model_version=slot.serving.model_version if slot.serving else None,
        pending_model_version=slot.pending.embedder.model_version if slot.pending else None,
        message=message,
    )
    with life.sessions() as session:
        Repository(session).audit("reload", name, actor.fingerprint, None, result.model_dump())
        session.commit()
    return result


def identify_point(serving: Serving, limits: Limits, species: str) -> IdentifyPoint:
    """What ``/identify`` decides with for ``species`` now (:func:`operating_point`)."""
    card = serving.embedder.card
    image_counts = serving.gallery.image_counts()
    point = operating_point(card, limits, species, image_counts, None)
    expected = None
    if point.table is not None and point.target_fpir is not None:
        expected = point.table.expected_tpir(point.table_size, point.target_fpir)
    return IdentifyPoint(
        threshold=point.threshold,
        threshold_source=point.source,
        target_fpir=point.target_fpir,
        review_threshold=point.review_threshold,
        min_confidence=point.min_confidence,
        gallery_images=gallery_images(image_counts),
        expected_tpir=expected,
        reason=point.reason,
    )


def describe(session: Session, registry: Registry, limits: Limits) -> list[SpeciesPublic]:
    repo = Repository(session)
    known = {species.name: species for species in repo.all_species()}
    result = []
    for name in sorted(registry.slots):
        slot = registry.slots[name]
        serving = slot.serving
        embedder = serving.embedder if serving else (slot.pending.embedder if slot.pending else None)
        card = embedder.card if embedder else None
        threshold, source = (
            effective_threshold(card, limits.default_threshold, None) if card else (None, None)
        )
        species = known.get(name)
        pending = slot.pending
        result.append(
            SpeciesPublic(
                name=name,
                status=slot.status.value,
                reason=slot.reason,
                model_version=serving.model_version if serving else None,
                pending_model_version=pending.embedder.model_version if pending else None,
                reembedding={"done": pending.done, "total": pending.total} if pending else None,
                embedding_dim=card.embedding_dim if card else None,
                architecture=card.architecture if card else None,
                input_size=list(card.preprocess.input_size) if card else None,
                preprocessing_version=card.preprocess.version if card else None,
                threshold=threshold,
                threshold_source=source,
                threshold_far=card.threshold_far if card else None,
                identify=identify_point(serving, limits, name) if serving else None,
                herd_check=card.herd.to_dict() if card and card.herd else None,
                metrics=dict(card.metrics) if card else {},
                trained_for=card.relabelled_from if card else None,
                device=str(embedder.device) if embedder else None,
                index_on_gpu=serving.gallery.on_gpu if serving else None,
                index_size=len(serving.gallery) if serving else None,
                individuals=repo.count_individuals(species.id) if species else 0,
                images=repo.count_images(species.id) if species else 0,
            )
        )
    return result


def describe_one(session: Session, registry: Registry, limits: Limits, name: str) -> SpeciesPublic:
    registry.slot(name)
    return next(item for item in describe(session, registry, limits) if item.name == name)


def _checks(database: bool, models: bool, indexes: bool) -> dict[CheckName, Literal["up", "down"]]:
    def state(ok: bool) -> Literal["up", "down"]:
        return "up" if ok else "down"

    return {"database": state(database), "models": state(models), "indexes": state(indexes)}


def readiness(sessions: sessionmaker[Session], registry: Registry) -> StatusResult:
    """Ready when the database answers, some species serves, and every serving index matches the database.

    The result holds the errors behind each failed check; the open probe shows only which failed.
    """
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database means "not ready"
        any_serving = any(slot.serving is not None for slot in registry.slots.values())
        return StatusResult(
            ready=False,
            checks=_checks(False, any_serving, True),
            database={"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]},
            species=[
                SpeciesReadiness(
                    name=name,
                    status=slot.status.value,
                    reason=slot.reason,
                    detail=slot.detail,
                    index_size=None,
                    database_embeddings=None,
                    database_images=None,
                    consistent=False,
                )
                for name, slot in sorted(registry.slots.items())
            ],
        )
    items = []
    with sessions() as session:
        repo = Repository(session)
        for name, slot in sorted(registry.slots.items()):
            species = repo.species_by_name(name)
            # The write lock keeps an enroll from committing between the two counts.
            with slot.write_lock:
                serving = slot.serving
                index_size = len(serving.gallery) if serving else None
                embeddings = repo.count_embeddings(serving.model_version_id) if serving else None
                images = repo.count_images(species.id) if species else 0
                session.rollback()  # end the read transaction; the next species reads fresh
            items.append(
                SpeciesReadiness(
                    name=name,
                    status=slot.status.value,
                    reason=slot.reason,
                    detail=slot.detail,
                    index_size=index_size,
                    database_embeddings=embeddings,
                    database_images=images,
                    consistent=serving is not None and index_size == embeddings,
                )
            )
    serving_items = [item for item in items if item.status in (SpeciesStatus.READY, SpeciesStatus.REINDEXING)]
    waiting = [item for item in items if item.status == SpeciesStatus.BUILDING]
    models = bool(serving_items) and not waiting
    indexes = all(item.consistent for item in serving_items)
    return StatusResult(
        ready=models and indexes,
        checks=_checks(True, models, indexes),
        database={"ok": True, "error": None},
        species=items,
    )
