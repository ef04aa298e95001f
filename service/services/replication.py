"""Several API processes on one Postgres database: each keeps its indexes in step with the others.

Every enroll, delete, merge and image delete logs the embedding ids it touched in
``index_changes`` in its own transaction, and NOTIFYs ``animalid_index_changes``; Postgres delivers
the notification when, and only if, that transaction commits. Each process runs an
:class:`IndexFollower` thread that LISTENs on its own connection and, on every notification and at
least every ``poll_s`` seconds, reads the changes past the last one it applied and reconciles its
index with the database for those ids: present in the serving model version means searchable
(added, or moved to its current individual), absent means removed. Reconciling is idempotent, so a
process applying its own changes again, a missed notification or a reconnect does no harm: the
catch-up by sequence heals it.

Sequence numbers are taken at insert, so a transaction can commit after a later-numbered one; a
number skipped by a catch-up is asked for again for ``gap_timeout_s`` (after which it is taken to
belong to a transaction that rolled back).

SQLite stays single-process: nothing is logged, and the follower is not started. The log keeps
an hour of changes (pruned by the followers).
A model switch is done once: the process that re-embeds logs a "model" change with the activation,
and every other process whose artifact is that model swaps to it, building its index from the
vectors already stored (:func:`follow_model_switch`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
from sqlalchemy import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.db.repository import INDEX_CHANNEL, Repository, vector_from_bytes
from service.ml.gallery import GalleryEntry
from service.ml.registry import Registry
from service.security import Principal, Scope
from service.services.species import Lifecycle, reload_species
from training.artifact import ArtifactError, read_card

# Who a reload that follows another process's model switch is audited as.
FOLLOWER_ACTOR = Principal(scope=Scope.ADMIN, fingerprint="index-follower")

log = logging.getLogger(__name__)

# Changes before the last committed one that a starting process applies again.
MARK_LOOKBACK = 100
# How long the change log is kept. A process cut off from the database for longer misses changes
# and must be restarted (its /ready then reports the index as inconsistent with the database).
RETENTION = timedelta(hours=1)
PRUNE_EVERY_S = 300.0
WAIT_S = 0.2  # longest wait for a notification before checking for stop()


@dataclass(frozen=True)
class FollowConfig:
    database_url: str
    poll_s: float = 1.0  # catch-up without a notification at least this often
    gap_timeout_s: float = 60.0
    reconnect_s: float = 1.0


def reconcile(sessions: sessionmaker[Session], registry: Registry, species: str, ids: Iterable[int]) -> int:
    """Make the species' serving index agree with the database on ``ids``; the vectors changed."""
    slot = registry.slots.get(species)
    wanted = {int(i) for i in ids}
    if slot is None or not wanted:
        return 0
    with slot.write_lock:
        serving = slot.serving
        if serving is None:
            return 0
        with sessions() as session:
            rows = {
                row.embedding_id: row
                for row in Repository(session).gallery_rows(wanted, serving.model_version_id)
            }
        gallery = serving.gallery
        changed = gallery.remove([i for i in wanted if i not in rows])
        new = [row for i, row in rows.items() if i not in gallery]
        if new:
            gallery.add(
                [row.embedding_id for row in new],
                np.stack([vector_from_bytes(row.vector) for row in new]),
                [GalleryEntry(image_id=row.image_id, individual_id=row.individual_id) for row in new],
            )
            changed += len(new)
        for i, row in rows.items():
            entry = gallery.entry(i)
            if entry is not None and entry.individual_id != row.individual_id:
                gallery.reassign([i], row.individual_id)
                changed += 1
        return changed


def follow_model_switch(life: Lifecycle, species: str) -> str:
    """Another process re-embedded ``species`` with a new model and activated it: serve it here too,
    from the vectors already stored (no second re-embedding), if this process's artifact is that
    model. Otherwise say so and keep serving: the slot's index no longer matches the database, and
    /ready reports it until the process gets the same artifact and restarts."""
    slot = life.registry.slots.get(species)
    with life.sessions() as session:
        repo = Repository(session)
        row = repo.species_by_name(species)
        active = repo.active_version(row.id) if row is not None else None
    if active is None or (
        slot is not None and slot.serving is not None and slot.serving.model_version_id == active.id
    ):
        return "already serving the active model"
    try:
        card = read_card(life.models_dir / species)
    except (ArtifactError, OSError) as exc:
        log.warning("species %s: another process activated model %s; here: %s", species, active.version, exc)
        return f"no artifact: {exc}"
    if card.model_version != active.version:
        log.warning(
            "species %s: another process activated model %s but %s holds %s; give this process that "
            "artifact and restart it",
            species,
            active.version,
            life.models_dir / species,
            card.model_version,
        )
        return "a different artifact here"
    return reload_species(life, species, FOLLOWER_ACTOR).message


class IndexFollower:
    """The thread that applies other processes' index changes (Postgres only)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        registry: Registry,
        config: FollowConfig,
        on_model_switch: Callable[[str], object] | None = None,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._config = config
        self._on_model_switch = on_model_switch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cursor = 0  # the highest sequence number applied
        self._gaps: dict[int, float] = {}  # skipped sequence number -> when first seen
        self.applied = 0  # changes applied so far
        self._pruned = time.monotonic()
        self._catching_up = threading.Lock()

    def mark(self) -> None:
        """Start a little before the changes committed so far: call before building the indexes, so
        any change committed during the build, or numbered lower but committed later than the last
        one, is applied again (harmlessly) after it."""
        with self._sessions() as session:
            self.cursor = max(0, Repository(session).last_index_change() - MARK_LOOKBACK)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def catch_up(self) -> int:
        """Apply every change past the cursor (and the gaps still awaited); how many were applied.
        Safe to call from another thread (tests wait for their own writes to be applied this way)."""
        with self._catching_up:
            return self._catch_up()

    def _catch_up(self) -> int:
        total = 0
        while True:
            now = time.monotonic()
            self._gaps = {
                seq: seen for seq, seen in self._gaps.items() if now - seen < self._config.gap_timeout_s
            }
            with self._sessions() as session:
                found = Repository(session).index_changes(self.cursor, self._gaps)
                changes = [(change.seq, change.species, list(change.embedding_ids)) for change in found]
                switched = {change.species for change in found if change.kind == "model"}
            if not changes:
                return total
            by_species: dict[str, set[int]] = defaultdict(set)
            for seq, species, ids in changes:
                by_species[species].update(ids)
                self._gaps.pop(seq, None)
            for species in sorted(switched):
                if self._on_model_switch is not None:
                    self._on_model_switch(species)
            for species, touched in by_species.items():
                reconcile(self._sessions, self._registry, species, touched)
            newest = max(seq for seq, _, _ in changes)
            applied = {seq for seq, _, _ in changes}
            for seq in range(self.cursor + 1, newest):
                if seq not in applied:
                    self._gaps.setdefault(seq, now)
            self.cursor = max(self.cursor, newest)
            total += len(changes)
            self.applied += len(changes)

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned < PRUNE_EVERY_S:
            return
        self._pruned = now
        with self._sessions() as session:
            removed = Repository(session).prune_index_changes(datetime.now(UTC) - RETENTION)
            session.commit()
        if removed:
            log.info("index follower: pruned %d changes older than %s", removed, RETENTION)

    def _run(self) -> None:
        conninfo = make_url(self._config.database_url).set(drivername="postgresql")
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as conn:
                    conn.execute(f"LISTEN {INDEX_CHANNEL}")
                    self.catch_up()  # whatever was committed before LISTEN took effect
                    last = time.monotonic()
                    while not self._stop.is_set():
                        # Short waits, so that stop() is quick; a catch-up on a notification or every poll_s.
                        notified = any(True for _ in conn.notifies(timeout=WAIT_S, stop_after=1))
                        if notified or time.monotonic() - last >= self._config.poll_s:
                            self.catch_up()
                            self._prune()
                            last = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a lost connection or a failed catch-up: retry
                # One line, no traceback: an outage is reported by the database health check, and a
                # failing catch-up says why here; the next connection catches up on what was missed.
                log.warning(
                    "index follower: %s: %s; reconnecting in %.1f s",
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    self._config.reconnect_s,
                )
                self._stop.wait(self._config.reconnect_s)
