"""Remove stored image files that no database row points at.

The service writes an image file before the row that points at it commits (image_store.py), so a
process killed in between leaves a file nobody will ever read. At start-up every file older than a
grace period is checked against the database, in batches, and the orphans are removed. The grace
period spares files whose row is about to commit in another process sharing the store.
"""

from __future__ import annotations

import itertools
import logging

from sqlalchemy.orm import Session, sessionmaker

from service.db.repository import Repository
from service.image_store import ImageStore
from service.metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 500


def sweep(sessions: sessionmaker[Session], store: ImageStore, grace_seconds: float, metrics: Metrics) -> int:
    """Remove orphan files older than ``grace_seconds``; returns how many were removed."""
    removed = checked = 0
    files = store.files_older_than(grace_seconds)
    while batch := list(itertools.islice(files, BATCH)):
        checked += len(batch)
        ids = [image_id for image_id in map(store.image_id, batch) if image_id is not None]
        with sessions() as session:
            known = Repository(session).storage_paths(ids)
        for relative in batch:
            if relative not in known:
                store.delete(relative)
                removed += 1
    metrics.orphans_removed.inc(removed)
    if removed:
        log.warning(
            "removed %d orphan image files (no database row, older than %d s) of %d checked in %s",
            removed,
            grace_seconds,
            checked,
            store.root,
        )
    else:
        log.info("no orphan image files among %d stored files older than %d s", checked, grace_seconds)
    return removed
