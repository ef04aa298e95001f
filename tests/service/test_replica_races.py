"""Two processes writing the same records at once (replicas on one database). Creating the same row:
a species and a model version (replicas starting on a fresh database, or every replica's model
watcher reloading a new artifact), an animal enrolled under the same external id on two replicas;
the second gets the first's row instead of a unique-key error. Changing the same animals (deletes,
merges, photo deletes): they lock the animals' rows and run one after the other; the one that finds
its animal or photo gone is answered 404 and writes nothing. A deadlock is a conflict to retry, not
an outage."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import httpx
import pytest
from apps import AppRunner
from fastapi.testclient import TestClient
from imagegen import jpeg
from sqlalchemy import event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.db.health import is_conflict
from service.db.models import AuditEntry
from service.db.repository import Repository
from service.db.session import make_engine, make_sessionmaker
from service.runtime import Runtime
from service.settings import Settings


@pytest.fixture
def replicas(backend: str, settings: Settings, runner: AppRunner) -> tuple[TestClient, TestClient]:
    """Two API processes on one database. SQLite serves one process: skipped there."""
    if backend == "sqlite":
        pytest.skip("one process per SQLite database")
    return runner.start(settings), runner.start(settings)


def register(session: Session) -> tuple[int, int]:
    repo = Repository(session)
    species = repo.ensure_species("okapi")
    version = repo.ensure_model_version(species.id, "okapi-1", 8, "v1", 0.5, {"species": "okapi"})
    return species.id, version.id


def enrolled(client: TestClient, seed: int, external_id: str, photos: int = 2) -> tuple[str, list[str]]:
    """An animal enrolled with ``photos`` photos: its id and its photos' ids."""
    files = [("images", (f"{s}.jpg", jpeg(seed, s), "image/jpeg")) for s in range(photos)]
    answer = client.post("/enroll", data={"species": "dog", "external_id": external_id}, files=files).json()
    return answer["individual"]["id"], [image["image_id"] for image in answer["images"]]


def merge_pair(client: TestClient, seed: int, prefix: str) -> tuple[str, str, list[str]]:
    """Two animals of three photos each to merge: the target's id, the source's and its photos'."""
    target, _ = enrolled(client, seed, f"{prefix}-t", photos=3)
    source, photos = enrolled(client, seed + 1, f"{prefix}-s", photos=3)
    return target, source, photos


def merging(client: TestClient, target: str, source: str) -> Callable[[], httpx.Response]:
    """A merge of ``source`` into ``target`` through ``client``, to send with ``at_once``."""
    return partial(client.post, f"/individuals/{target}/merge", json={"source_id": source})


def later(seconds: float, request: Callable[[], httpx.Response]) -> httpx.Response:
    """``request`` sent ``seconds`` late: to land inside the other request rather than before it."""
    time.sleep(seconds)
    return request()


def at_once(
    first: Callable[[], httpx.Response], second: Callable[[], httpx.Response]
) -> tuple[httpx.Response, httpx.Response]:
    """Send two requests at the same moment (each through its own replica); both answers."""
    with ThreadPoolExecutor(2) as pool:
        one, other = pool.submit(first), pool.submit(second)
        return one.result(), other.result()


def test_a_registration_racing_another_gets_its_rows(database_url: str) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        mine = register(first)  # inserted, not committed: the other insert waits on the unique keys
        theirs: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with sessions() as second:
                    theirs.append(register(second))
                    second.commit()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)
        first.commit()
        first.close()
        thread.join(30)
        assert not errors, errors
        assert theirs == [mine]
    finally:
        engine.dispose()


def test_an_enroll_racing_another_process_creating_the_individual_joins_it(
    backend: str, settings: Settings, runner: AppRunner
) -> None:
    """Another replica creates the same new animal (same external id) while this one enrolls it: the
    enroll waits on the unique key, then adds its photo to the other's animal instead of failing."""
    client = runner.start(settings)
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with runtime.sessions() as other:
        repo = Repository(other)
        species = repo.species_by_name("dog")
        assert species is not None
        theirs = repo.create_individual(species.id, "race-1", None, None)  # not committed yet
        answers: list[httpx.Response] = []
        enroll = threading.Thread(
            target=lambda: answers.append(
                client.post(
                    "/enroll",
                    data={"species": "dog", "external_id": "race-1"},
                    files=[("images", ("a.jpg", jpeg(860, 0), "image/jpeg"))],
                )
            )
        )
        enroll.start()
        time.sleep(1.0)
        other.commit()
    enroll.join(60)
    (answer,) = answers
    assert answer.status_code == 201, answer.text
    assert answer.json()["individual"]["id"] == str(theirs.id)
    assert client.get(f"/individuals/{theirs.id}").json()["image_count"] == 1


def test_merges_in_opposite_directions_on_two_replicas_keep_every_photo(
    replicas: tuple[TestClient, TestClient],
) -> None:
    """Two replicas merge A into B and B into A at the same moment: they queue on the animals' rows,
    one wins and the other finds its source gone (404), never a deadlock; no photo is lost."""
    first, second = replicas
    for round_ in range(4):
        ids = [enrolled(first, 870 + 2 * round_ + k, f"m{round_}-{k}", photos=3)[0] for k in range(2)]

        answers = at_once(merging(first, ids[0], ids[1]), merging(second, ids[1], ids[0]))
        assert sorted((a.status_code, a.json().get("code")) for a in answers) == [
            (200, None),
            (404, "individual_not_found"),
        ], [a.text for a in answers]
        left = [first.get(f"/individuals/{i}").json() for i in ids]
        assert sum(i.get("image_count", 0) for i in left) == 6, left
    # A lost race (a deadlock is one) is no outage: neither process took the database for down.
    for client in (first, second):
        assert not client.app.state.runtime.database.down  # type: ignore[attr-defined]


def test_a_deadlock_is_a_conflict_to_retry_and_a_refused_connection_an_outage() -> None:
    """What the error handlers and the health watch tell apart, by SQLSTATE."""

    class DriverError(Exception):
        def __init__(self, sqlstate: str | None) -> None:
            self.sqlstate = sqlstate

    def error(sqlstate: str | None) -> OperationalError:
        return OperationalError("SELECT 1", {}, DriverError(sqlstate))

    assert is_conflict(error("40P01")) and is_conflict(error("40001"))  # deadlock, serialisation
    assert is_conflict(error("55P03"))  # a lock still held by another after lock_timeout
    assert not is_conflict(error("08006")) and not is_conflict(error(None))  # connection failure
    assert not is_conflict(None)


def deleted_through_both_at_once(
    first: TestClient, second: TestClient, path: str, not_found: str, action: str, individual_id: str
) -> None:
    """DELETE ``path`` through both replicas at the same moment: one is answered 200; the other
    waits on it, finds nothing left and is answered 404 ``not_found``, not a second success; the
    audit log holds one ``action`` about the individual."""
    answers = at_once(partial(first.delete, path), partial(second.delete, path))
    assert sorted((a.status_code, a.json().get("code")) for a in answers) == [
        (200, None),
        (404, not_found),
    ], [a.text for a in answers]
    log = first.get("/audit", params={"action": action, "individual_id": individual_id})
    assert log.json()["count"] == 1, log.text


def test_one_animal_deleted_through_two_replicas_at_once_is_deleted_once(
    replicas: tuple[TestClient, TestClient],
) -> None:
    first, second = replicas
    for round_ in range(4):
        individual_id, _ = enrolled(first, 890 + round_, f"d{round_}")
        path = f"/individuals/{individual_id}"
        deleted_through_both_at_once(
            first, second, path, "individual_not_found", "delete_individual", individual_id
        )
        assert first.get(path).status_code == 404


def test_an_animal_merged_on_one_replica_while_deleted_on_another_loses_no_photo_of_the_target(
    replicas: tuple[TestClient, TestClient],
) -> None:
    """Merge S into T on one replica and delete S on the other at the same moment. One wins. If the
    merge wins, the delete must not take S's photos from T; if the delete wins, the merge must not
    claim to have moved them. The loser finds S gone: 404."""
    first, second = replicas
    for round_ in range(4):
        target, source, _ = merge_pair(first, 930 + 2 * round_, f"md{round_}")

        merged, deleted = at_once(
            merging(first, target, source), partial(second.delete, f"/individuals/{source}")
        )
        assert sorted([merged.status_code, deleted.status_code]) == [200, 404], (merged.text, deleted.text)
        loser = deleted if merged.status_code == 200 else merged
        assert loser.json()["code"] == "individual_not_found", loser.text
        assert first.get(f"/individuals/{source}").status_code == 404
        photos = second.get(f"/individuals/{target}").json()["image_count"]
        assert photos == (6 if merged.status_code == 200 else 3), (photos, merged.text, deleted.text)


def test_one_photo_deleted_through_two_replicas_at_once_is_deleted_once(
    replicas: tuple[TestClient, TestClient],
) -> None:
    first, second = replicas
    for round_ in range(4):
        individual_id, images = enrolled(first, 960 + round_, f"p{round_}")
        path = f"/individuals/{individual_id}/images/{images[0]}"
        deleted_through_both_at_once(first, second, path, "image_not_found", "delete_image", individual_id)
        assert second.get(f"/individuals/{individual_id}").json()["image_count"] == 1


def test_a_photo_deleted_on_one_replica_while_its_animal_is_merged_on_another_is_counted_once(
    replicas: tuple[TestClient, TestClient],
) -> None:
    """Merge S into T on one replica and delete one of S's photos on the other at the same moment.
    They run one after the other: either the photo goes first and the merge moves the two left, or
    the merge moves all three and the photo delete finds S gone. Never a merge that counts a photo
    it did not move, nor a delete that takes the photo from T and audits it under S."""
    first, second = replicas
    for round_ in range(4):
        target, source, photos = merge_pair(first, 1000 + 2 * round_, f"mp{round_}")

        merged, deleted = at_once(
            merging(first, target, source),
            partial(second.delete, f"/individuals/{source}/images/{photos[0]}"),
        )
        assert merged.status_code == 200, merged.text
        if deleted.status_code == 200:  # the photo delete went first
            expected_moved = 2
        else:
            assert deleted.json()["code"] in {"individual_not_found", "image_not_found"}, deleted.text
            expected_moved = 3
        assert merged.json()["moved_images"] == expected_moved, (merged.text, deleted.text)
        assert second.get(f"/individuals/{target}").json()["image_count"] == 3 + expected_moved
        audit = first.get("/audit", params={"action": "delete_image"}).json()["data"]
        assert [entry["individual_id"] for entry in audit if entry["details"]["image"] == photos[0]] == (
            [source] if deleted.status_code == 200 else []
        ), audit


def test_an_animal_deleted_on_one_replica_while_another_merges_into_it_takes_every_photo(
    replicas: tuple[TestClient, TestClient],
) -> None:
    """Delete T on one replica while the other merges S into T. Either the merge goes first and the
    delete takes all six photos (and says so), or the delete goes first and the merge finds T gone,
    leaving S as it was. Never a delete that reports three photos while six went with T, nor a
    merge answered 404 after its commit. The delete is sent 0 to 11 ms late."""
    first, second = replicas
    for round_ in range(12):
        target, source, _ = merge_pair(first, 1020 + 2 * round_, f"dm{round_}")

        merged, deleted = at_once(
            merging(first, target, source),
            partial(later, 0.001 * round_, partial(second.delete, f"/individuals/{target}")),
        )
        assert deleted.status_code == 200, deleted.text
        assert first.get(f"/individuals/{target}").status_code == 404
        if merged.status_code == 200:  # the merge went first
            assert deleted.json()["deleted_images"] == 6, (merged.text, deleted.text)
            assert first.get(f"/individuals/{source}").status_code == 404
        else:
            assert merged.json()["code"] == "individual_not_found", merged.text
            assert deleted.json()["deleted_images"] == 3, deleted.text
            assert second.get(f"/individuals/{source}").json()["image_count"] == 3


def test_a_photo_enrolled_on_one_replica_while_its_animal_is_deleted_on_another_is_not_lost(
    replicas: tuple[TestClient, TestClient], settings: Settings
) -> None:
    """Enroll a new photo of A (by its external id) on one replica while the other deletes A. Either
    the enroll goes first and the delete takes its photo too (and counts it), or the delete goes
    first and the enroll, finding no A, creates a new A with the photo. The enroll's answer is the
    animal as its commit left it, even when the delete removes it a moment later (it was a 500).
    Every stored file belongs to a photo. The delete is sent 0 to 22 ms late, so that it lands
    before, during and after the enroll's own work."""
    first, second = replicas
    for round_ in range(12):
        external_id = f"ed{round_}"
        individual_id, _ = enrolled(first, 1040 + round_, external_id)
        files = [("images", ("new.jpg", jpeg(1050 + round_, 9), "image/jpeg"))]
        added, deleted = at_once(
            partial(first.post, "/enroll", data={"species": "dog", "external_id": external_id}, files=files),
            partial(later, 0.002 * round_, partial(second.delete, f"/individuals/{individual_id}")),
        )
        assert (added.status_code, deleted.status_code) == (201, 200), (added.text, deleted.text)
        now = added.json()["individual"]
        if now["id"] == individual_id:  # the enroll went first
            assert now["image_count"] == 3 and deleted.json()["deleted_images"] == 3, deleted.text
            assert second.get("/individuals", params={"external_id": external_id}).json()["count"] == 0
        else:
            assert deleted.json()["deleted_images"] == 2, deleted.text
            assert (now["external_id"], now["image_count"]) == (external_id, 1), now
    stored = sum(1 for path in settings.image_store_dir.rglob("*") if path.is_file())
    listed = first.get("/individuals", params={"species": "dog", "limit": 500}).json()
    assert stored == sum(i["image_count"] for i in listed["data"]), (stored, listed)


@contextmanager
def deleted_as_committed(runtime: Runtime, action: str, individual_id: str) -> Iterator[list[str]]:
    """Another replica deletes the animal the moment this process commits the request that audits
    ``action``, before that request sends its answer: the window that a read of the answer after the
    commit falls into. Yields the actions whose commit it followed (one, when it fired)."""
    other_engine = make_engine(runtime.settings.database_url)
    other = make_sessionmaker(other_engine)
    fired: list[str] = []

    def note(session: Session, _context: object) -> None:
        if any(isinstance(row, AuditEntry) and row.action == action for row in session.new):
            session.info["audited"] = action

    def delete(session: Session) -> None:
        if session.info.pop("audited", None) is None or fired:
            return
        fired.append(action)
        with other() as theirs:
            repo = Repository(theirs)
            individual = repo.get_individual(uuid.UUID(individual_id))
            assert individual is not None
            repo.delete_individual(individual)
            theirs.commit()

    event.listen(runtime.sessions, "after_flush", note)
    event.listen(runtime.sessions, "after_commit", delete)
    try:
        yield fired
    finally:
        event.remove(runtime.sessions, "after_flush", note)
        event.remove(runtime.sessions, "after_commit", delete)
        other_engine.dispose()


def test_an_enroll_answers_with_the_animal_its_commit_left_though_it_is_deleted_right_after(
    settings: Settings, runner: AppRunner
) -> None:
    """A delete through another replica lands between the enroll's commit and its answer (the race
    test above hits that window only now and then): the answer is still 201 with the animal as the
    commit left it, photo counted, and the animal is gone after. On the code that read the animal
    after its commit this was a 500 for a stored photo."""
    client = runner.start(settings)
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    individual_id, _ = enrolled(client, 1060, "window")
    with deleted_as_committed(runtime, "enroll", individual_id) as fired:
        answer = client.post(
            "/enroll",
            data={"species": "dog", "external_id": "window"},
            files=[("images", ("new.jpg", jpeg(1061, 0), "image/jpeg"))],
        )
    assert fired == ["enroll"]
    assert answer.status_code == 201, answer.text
    now = answer.json()["individual"]
    assert (now["id"], now["image_count"]) == (individual_id, 3), now
    assert client.get(f"/individuals/{individual_id}").status_code == 404


def test_a_merge_answers_with_the_target_its_commit_left_though_it_is_deleted_right_after(
    settings: Settings, runner: AppRunner
) -> None:
    """The same window for a merge: the target deleted through another replica right after the merge
    commits. The answer is 200 with the target holding both animals' photos (it was a 404)."""
    client = runner.start(settings)
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    target, source, _ = merge_pair(client, 1062, "window")
    with deleted_as_committed(runtime, "merge", target) as fired:
        answer = merging(client, target, source)()
    assert fired == ["merge"]
    assert answer.status_code == 200, answer.text
    merged = answer.json()["individual"]
    assert (merged["id"], merged["image_count"]) == (target, 6), merged
    assert answer.json()["moved_images"] == 3
    assert client.get(f"/individuals/{target}").status_code == 404


@contextmanager
def held_by_another_process(backend: str, runtime: Runtime, individual_id: str) -> Iterator[None]:
    """What a process that hangs mid-write holds: on Postgres the animal's row, on SQLite the
    database file's write lock; let go when the block ends."""
    if backend == "sqlite":
        other = sqlite3.connect(str(make_url(runtime.settings.database_url).database), timeout=0)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.rollback()
            other.close()
        return
    with runtime.sessions() as stuck:
        Repository(stuck).lock_individuals([uuid.UUID(individual_id)])  # and never commits
        yield
        stuck.rollback()


def test_a_write_waiting_on_a_stuck_process_gives_up_with_409_and_writes_nothing(
    backend: str, settings: Settings, runner: AppRunner
) -> None:
    """Another process (a replica, a worker) holds what a delete needs and hangs (paused, or cut off
    before the server notices). The delete waits ``database_lock_wait_seconds``, then is answered
    409 ``concurrent_change`` with nothing written, the database is not taken for down, and the
    same delete goes through once the other lets go."""
    client = runner.start(settings.model_copy(update={"database_lock_wait_seconds": 1.0}))
    individual_id, _ = enrolled(client, 1070, "stuck")
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with held_by_another_process(backend, runtime, individual_id):
        started = time.monotonic()
        refused = client.delete(f"/individuals/{individual_id}")
        waited = time.monotonic() - started
        assert (refused.status_code, refused.json()["code"]) == (409, "concurrent_change"), refused.text
        assert 0.9 < waited < 10, waited
        assert not runtime.database.down
        assert client.get(f"/individuals/{individual_id}").json()["image_count"] == 2
    assert client.delete(f"/individuals/{individual_id}").json()["deleted_images"] == 2
