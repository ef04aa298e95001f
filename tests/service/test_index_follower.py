"""The index change log behind several API processes: what is logged, catch-up, pruning."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apps import AppRunner, make_models_dir
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


def test_a_model_switch_is_reembedded_once_and_the_other_process_swaps_to_it(
    backend: str, settings: Settings, runner: AppRunner, service_root: Path, artifacts: dict[str, Path]
) -> None:
    if backend == "sqlite":
        return  # one process per SQLite database: nothing to follow
    first, second = runner.start(settings), runner.start(settings)
    a: Runtime = first.app.state.runtime  # type: ignore[attr-defined]
    b: Runtime = second.app.state.runtime  # type: ignore[attr-defined]
    enroll(first, 820)
    enroll(first, 821)
    old = b.registry.serving("dog").model_version

    make_models_dir(service_root, artifacts, dog="dog_v2")  # both processes read this folder
    new = first.post("/species/dog/reload").json()["pending_model_version"]
    assert new != old and a.reembedder.wait("dog", timeout=120)
    assert a.registry.serving("dog").model_version == new

    deadline = time.monotonic() + 30
    while not swapped(b, new) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert swapped(b, new) and len(b.registry.serving("dog").gallery) == 4
    assert "dog" not in b.reembedder._threads  # not re-embedded
    ready = second.get("/status").json()
    assert ready["ready"] and all(item["consistent"] for item in ready["species"] if item["name"] == "dog")


def swapped(runtime: Runtime, version: str) -> bool:
    """Whether the process serves dog ``version`` with no re-embedding pending. Read under the
    slot's write lock, which a swap holds from setting the new index to ending the pending job."""
    slot = runtime.registry.slots["dog"]
    with slot.write_lock:
        return slot.serving is not None and slot.serving.model_version == version and slot.pending is None


def reembedded_batches(runtime: Runtime) -> int:
    """How many batches this process embedded for a re-embedding."""
    value = runtime.metrics.registry.get_sample_value(
        "animalid_inference_seconds_count", {"species": "dog", "operation": "reembed"}
    )
    return int(value or 0)


def test_a_model_switch_reloaded_on_both_processes_is_still_reembedded_once(
    backend: str, settings: Settings, runner: AppRunner, service_root: Path, artifacts: dict[str, Path]
) -> None:
    """Every replica's model watcher reloads a new artifact in the shared folder within seconds of
    the others (as does a restart of them all): one process re-embeds, the other waits and swaps."""
    if backend == "sqlite":
        return  # one process per SQLite database
    settings = settings.model_copy(update={"reembed_batch_size": 1})
    first, second = runner.start(settings), runner.start(settings)
    a: Runtime = first.app.state.runtime  # type: ignore[attr-defined]
    b: Runtime = second.app.state.runtime  # type: ignore[attr-defined]
    for individual in range(830, 850):
        enroll(first, individual)  # 40 images, one a batch

    make_models_dir(service_root, artifacts, dog="dog_v2")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda client: client.post("/species/dog/reload"), (first, second)))
    assert [r.status_code for r in answers] == [202, 202]
    new = answers[0].json()["pending_model_version"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(swapped(r, new) for r in (a, b)):
        time.sleep(0.1)
    for runtime in (a, b):
        assert swapped(runtime, new) and len(runtime.registry.serving("dog").gallery) == 40
        assert runtime.reembedder.wait("dog", timeout=30)
    assert sorted([reembedded_batches(a), reembedded_batches(b)]) == [0, 40]
    for client in (first, second):
        (dog,) = [s for s in client.get("/status").json()["species"] if s["name"] == "dog"]
        assert dog["consistent"] and dog["status"] == "ready", dog
