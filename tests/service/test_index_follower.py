"""The index change log behind several API processes: what is logged, catch-up, pruning."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from apps import AppRunner
from imagegen import jpeg
from sqlalchemy import func, select, update

from service.db.models import IndexChange
from service.db.repository import Repository
from service.runtime import Runtime
from service.settings import Settings


def enroll(client, individual: int) -> str:  # type: ignore[no-untyped-def]
    files = [("images", (f"{s}.jpg", jpeg(individual, s), "image/jpeg")) for s in range(2)]
    response = client.post("/enroll", data={"species": "dog", "external_id": f"f{individual}"}, files=files)
    assert response.status_code == 201, response.text
    return str(response.json()["individual"]["id"])


def changes(runtime: Runtime) -> list[IndexChange]:
    with runtime.sessions() as session:
        return list(session.scalars(select(IndexChange).order_by(IndexChange.seq)))


def test_writes_are_logged_on_postgres_only_and_another_process_catches_up(
    backend: str, settings: Settings, runner: AppRunner
) -> None:
    first = runner.start(settings)
    runtime: Runtime = first.app.state.runtime  # type: ignore[attr-defined]
    individual = enroll(first, 800)
    logged = changes(runtime)
    if backend == "sqlite":
        assert logged == [] and runtime.follower is None  # one process: nothing to follow
        return
    assert len(logged) == 1 and logged[0].species == "dog" and len(logged[0].embedding_ids) == 2

    # A second process on the same database, its follower stopped: it catches up by sequence alone.
    second = runner.start(settings)
    other: Runtime = second.app.state.runtime  # type: ignore[attr-defined]
    assert other.follower is not None
    other.follower.stop()
    first.delete(f"/individuals/{individual}").raise_for_status()
    kept = enroll(first, 801)
    gallery = other.registry.serving("dog").gallery
    assert len(gallery) == 2  # built at start: the first enroll only
    assert other.follower.catch_up() == 2  # the delete and the new enroll
    entries = [gallery.entry(int(i)) for i in gallery.snapshot()[0]]
    assert len(gallery) == 2 and {e.individual_id for e in entries if e is not None} == {uuid.UUID(kept)}
    assert other.follower.catch_up() == 0  # nothing new


def test_old_changes_are_pruned(backend: str, settings: Settings, runner: AppRunner) -> None:
    client = runner.start(settings)
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    enroll(client, 810)
    enroll(client, 811)
    with runtime.sessions() as session:
        oldest = select(func.min(IndexChange.seq)).scalar_subquery()
        two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
        session.execute(update(IndexChange).where(IndexChange.seq == oldest).values(created_at=two_hours_ago))
        pruned = Repository(session).prune_index_changes(datetime.now(UTC) - timedelta(hours=1))
        session.commit()
    assert pruned == (1 if backend == "postgres" else 0)
    assert len(changes(runtime)) == (1 if backend == "postgres" else 0)
