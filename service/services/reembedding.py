"""Background re-embedding after a species' model version changes.

The job embeds every stored image with the new model in batches, committing each batch, so a
restart resumes where it stopped. Meanwhile the old (model, index) pair keeps serving and enrolls
keep landing in it. Under the species write lock the job then embeds whatever was enrolled in the
meantime, builds the new index from the database, activates the new version (which drops the old
version's vectors) in one transaction, and swaps the serving pair in one assignment.

With several processes on one Postgres database, a version is re-embedded by one of them at a time
(a :class:`~service.db.claims.Claim` on it): the others wait, and swap to the version when the one
that re-embeds it activates it (``service.services.replication``), or take over if it dies.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.claims import Claim
from service.db.repository import Repository
from service.errors import ImageRejected
from service.image_store import ImageStore, ImageStoreError
from service.metrics import Metrics
from service.ml.ann import IndexPlan
from service.ml.images import ImagePolicy, decode_image
from service.ml.registry import Pending, Serving, SpeciesSlot
from service.services.galleries import build_gallery

log = logging.getLogger(__name__)

MAX_CONFLICTS = 5
CLAIM_POLL_S = 0.5  # how often a process waiting for another's re-embedding asks for the claim again


@dataclass(frozen=True)
class ReembedConfig:
    batch_size: int
    images: ImagePolicy  # of stored images: caps and decode slots, no quality gate
    use_gpu_index: bool | None
    index_plan: IndexPlan | None = None


class Reembedder:
    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        store: ImageStore,
        metrics: Metrics,
        config: ReembedConfig,
    ) -> None:
        self._engine = engine
        self._sessions = sessions
        self._store = store
        self._metrics = metrics
        self._config = config
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def start(self, slot: SpeciesSlot, pending: Pending) -> None:
        """Run ``pending`` for ``slot`` in a background thread. A newer job supersedes an older one."""
        with self._lock:
            slot.pending = pending
            thread = threading.Thread(
                target=self._run, args=(slot, pending), name=f"reembed-{slot.name}", daemon=True
            )
            self._threads[slot.name] = thread
            thread.start()

    def wait(self, species: str, timeout: float | None = None) -> bool:
        """Wait for the species' job to end; True if it ended (used by tests and the CLI)."""
        with self._lock:
            thread = self._threads.get(species)
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

    def _run(self, slot: SpeciesSlot, pending: Pending) -> None:
        claim = Claim(self._engine, "reembedding", pending.model_version_id)
        try:
            if self._wait_for_claim(slot, pending, claim):
                self._reembed(slot, pending)
        finally:
            claim.release()

    def _wait_for_claim(self, slot: SpeciesSlot, pending: Pending, claim: Claim) -> bool:
        """Take the claim on ``pending``'s version, waiting while another process holds it. False when
        asked to stop, or when the job ended meanwhile (the other process activated the version and
        this one followed it, or a newer reload superseded the job)."""
        waiting = False
        while True:
            try:
                if claim.try_take():
                    return True
            except Exception as exc:
                log.exception("species %s: cannot claim the re-embedding", slot.name)
                pending.error = f"{type(exc).__name__}: {exc}"
                self._give_up(slot, pending)
                return False
            if not waiting:
                log.info(
                    "species %s: another process is re-embedding %s; waiting for it",
                    slot.name,
                    pending.embedder.model_version,
                )
                waiting = True
            if self._stop.wait(CLAIM_POLL_S) or slot.pending is not pending:
                return False

    def _reembed(self, slot: SpeciesSlot, pending: Pending) -> None:
        try:
            with self._sessions() as session:
                repo = Repository(session)
                species = repo.species_by_name(slot.name)
                if species is None:
                    raise RuntimeError(f"species {slot.name!r} vanished from the database")
                species_id = species.id
                pending.total = repo.count_images(species_id)
            skipped: set[uuid.UUID] = set()
            if not self._catch_up(slot, pending, species_id, skipped):
                return
            with slot.write_lock:
                if slot.pending is not pending or not self._catch_up(slot, pending, species_id, skipped):
                    return
                gallery = build_gallery(
                    self._sessions,
                    pending.model_version_id,
                    pending.embedder.dim,
                    self._config.use_gpu_index,
                    self._config.index_plan,
                )
                with self._sessions() as session:
                    dropped = Repository(session).activate_version(species_id, pending.model_version_id)
                    Repository(session).record_model_switch(slot.name)  # other processes swap too
                    session.commit()
                slot.serving = Serving(pending.embedder, gallery, pending.model_version_id)
                slot.pending = None
                slot.disable(None)
            log.info(
                "species %s now serves %s (%d vectors, %d old vectors dropped, %d images unreadable)",
                slot.name,
                pending.embedder.model_version,
                len(gallery),
                dropped,
                len(skipped),
            )
        except Exception as exc:
            log.exception("re-embedding species %s failed", slot.name)
            pending.error = f"{type(exc).__name__}: {exc}"
            self._give_up(slot, pending)

    @staticmethod
    def _give_up(slot: SpeciesSlot, pending: Pending) -> None:
        """End a failed job: the slot keeps serving what it served (or is disabled), says why, and a
        reload of the same artifact starts over (the batches already committed are kept)."""
        with slot.write_lock:
            if slot.pending is pending:
                slot.pending = None
                slot.disable(
                    f"re-embedding with {pending.embedder.model_version} failed; reload the species to retry",
                    pending.error,
                )

    def _catch_up(
        self, slot: SpeciesSlot, pending: Pending, species_id: int, skipped: set[uuid.UUID]
    ) -> bool:
        """Embed every image lacking a vector from the pending version. False when asked to stop."""
        embedder = pending.embedder
        conflicts = 0
        while True:
            if self._stop.is_set() or slot.pending is not pending:
                return False
            with self._sessions() as session:
                repo = Repository(session)
                batch = [
                    image
                    for image in repo.images_missing_version(
                        species_id, pending.model_version_id, self._config.batch_size + len(skipped)
                    )
                    if image.id not in skipped
                ][: self._config.batch_size]
                if not batch:
                    return True
                readable, pictures = [], []
                for image in batch:
                    try:
                        decoded = decode_image(
                            self._store.read(image.storage_path),
                            self._config.images,
                            embedder.card.preprocess.input_size,
                        )
                    except (ImageStoreError, ImageRejected) as exc:
                        log.error("cannot re-embed image %s of %s: %s", image.id, slot.name, exc)
                        skipped.add(image.id)
                        continue
                    readable.append(image)
                    pictures.append(decoded.image)
                with self._metrics.time_inference(slot.name, "reembed"):
                    vectors = embedder.embed(pictures)
                try:
                    for image, vector in zip(readable, vectors, strict=True):
                        repo.add_embedding(image.id, pending.model_version_id, vector)
                    session.commit()
                except IntegrityError:
                    # An image was deleted or merged away meanwhile: drop the batch, query again.
                    session.rollback()
                    conflicts += 1
                    if conflicts > MAX_CONFLICTS:
                        raise
                    continue
                conflicts = 0
                pending.done += len(readable)
