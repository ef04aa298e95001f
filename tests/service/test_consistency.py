"""Index and database agree: after restarts, under concurrent writes, and across model changes."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from apps import READ, AppRunner, TestClient, make_models_dir, make_settings
from imagegen import jpeg
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from service.db.models import Embedding, ModelVersion
from service.db.repository import Repository
from service.security import ANONYMOUS_ADMIN
from service.services.species import reload_species


def enroll(client: TestClient, individual: int, shots: range, ext: str | None = None) -> dict:
    files = [("images", (f"{s}.jpg", jpeg(individual, s), "image/jpeg")) for s in shots]
    response = client.post(
        "/enroll", data={"species": "dog", "external_id": ext or f"d{individual}"}, files=files
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def identify(client: TestClient, image: bytes) -> dict:
    response = client.post(
        "/identify", data={"species": "dog", "top_k": "5"}, files={"image": image}, headers=READ
    )
    assert response.status_code == 200, response.text
    return response.json()


def snapshot(client: TestClient) -> tuple[np.ndarray, np.ndarray]:
    ids, vectors = client.app.state.runtime.registry.serving("dog").gallery.snapshot()
    order = np.argsort(ids)
    return ids[order], vectors[order]


def assert_ready(client: TestClient) -> dict:
    assert client.get("/ready").status_code == 200
    response = client.get("/status")
    assert response.status_code == 200, response.text
    dog = next(item for item in response.json()["species"] if item["name"] == "dog")
    assert dog["consistent"] and dog["index_size"] == dog["database_embeddings"] == dog["database_images"]
    return dog


def test_restart_rebuilds_an_identical_index(
    database_url: str, tmp_path: Path, artifacts, runner: AppRunner
) -> None:  # noqa: ANN001
    settings = make_settings(database_url, tmp_path, make_models_dir(tmp_path, artifacts, dog="dog"))
    first = runner.start(settings)
    made = {i: enroll(first, i, range(3)) for i in range(500, 506)}
    image = made[500]["images"][0]["image_id"]
    first.delete(f"/individuals/{made[500]['individual']['id']}/images/{image}")
    first.post(
        f"/individuals/{made[501]['individual']['id']}/merge",
        json={"source_id": made[502]["individual"]["id"]},
    )
    first.delete(f"/individuals/{made[503]['individual']['id']}")
    queries = [jpeg(i, 7) for i in range(500, 507)]
    before_ids, before_vectors = snapshot(first)
    before_answers = [identify(first, q)["candidates"] for q in queries]
    runner.stop(first)

    second = runner.start(settings)
    after_ids, after_vectors = snapshot(second)
    np.testing.assert_array_equal(after_ids, before_ids)
    np.testing.assert_array_equal(after_vectors, before_vectors)  # bit for bit
    assert [identify(second, q)["candidates"] for q in queries] == before_answers
    assert assert_ready(second)["index_size"] == 3 * 6 - 1 - 3


def test_concurrent_enrolls_and_identifies(client: TestClient) -> None:
    stop = threading.Event()
    failures: list[str] = []

    def writer(worker: int) -> int:
        done = 0
        for n in range(3):
            individual = 600 + 10 * worker + n
            body = enroll(client, individual, range(2))
            done += 2
            # Read your writes: the acknowledged individual is found by the very next request.
            answer = identify(client, jpeg(individual, 5))
            if answer["best"] is None or answer["best"]["individual_id"] != body["individual"]["id"]:
                failures.append(f"worker {worker}: {individual} not identified right after enroll")
        return done

    def reader() -> int:
        count = 0
        while not stop.is_set():
            identify(client, jpeg(600, 1))
            client.get(f"/individuals?limit=5&offset={count % 3}", headers=READ)
            count += 1
        return count

    with ThreadPoolExecutor(max_workers=6) as pool:
        readers = [pool.submit(reader) for _ in range(2)]
        writers = [pool.submit(writer, w) for w in range(4)]
        enrolled = sum(f.result() for f in writers)
        stop.set()
        assert all(f.result() > 0 for f in readers)
    assert failures == []
    assert assert_ready(client)["index_size"] == enrolled == 4 * 3 * 2


def test_concurrent_identical_enrolls_store_one_image(client: TestClient) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: enroll(client, 650, range(1), ext="same-dog"), range(4)))
    assert len({r["individual"]["id"] for r in results}) == 1
    assert sum(r["images"][0]["created"] for r in results) == 1
    assert assert_ready(client)["index_size"] == 1


def dog_versions(client: TestClient) -> dict[str, str]:
    with client.app.state.runtime.sessions() as session:
        return {row.version: row.status for row in session.scalars(select(ModelVersion))}


def embeddings_by_version(client: TestClient) -> dict[int, int]:
    with client.app.state.runtime.sessions() as session:
        rows = session.execute(
            select(Embedding.model_version_id, func.count()).group_by(Embedding.model_version_id)
        )
        return {int(version): int(count) for version, count in rows}


def test_a_new_model_is_reembedded_in_the_background_while_the_old_one_serves(
    database_url: str,
    tmp_path: Path,
    artifacts,
    runner: AppRunner,  # noqa: ANN001
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    client = runner.start(make_settings(database_url, tmp_path, models, reembed_batch_size=2))
    made = {i: enroll(client, i, range(2)) for i in range(700, 704)}
    old = client.get("/species/dog", headers=READ).json()["model_version"]
    slot = client.app.state.runtime.registry.slot("dog")
    make_models_dir(tmp_path, artifacts, dog="dog_v2")

    with slot.write_lock:  # holds the swap back; identifies never take this lock
        reload = client.post("/species/dog/reload")
        assert reload.status_code == 202, reload.text
        new = reload.json()["pending_model_version"]
        assert reload.json()["status"] == "reindexing" and new != old
        deadline = time.monotonic() + 60
        while slot.pending is not None and slot.pending.done < 8:
            assert time.monotonic() < deadline, "re-embedding made no progress"
            time.sleep(0.05)
        answer = identify(client, jpeg(701, 6))
        assert answer["model_version"] == old  # the old pair still serves
        assert answer["best"]["individual_id"] == made[701]["individual"]["id"]
        species = client.get("/species/dog", headers=READ).json()
        assert species["status"] == "reindexing" and species["reembedding"]["total"] == 8

    late = enroll(client, 705, range(2))  # lands before or after the swap; either way it must be indexed
    assert client.app.state.runtime.reembedder.wait("dog", timeout=60)
    species = client.get("/species/dog", headers=READ).json()
    assert (species["status"], species["model_version"], species["pending_model_version"]) == (
        "ready",
        new,
        None,
    )
    assert dog_versions(client) == {old: "retired", new: "active"}
    assert list(embeddings_by_version(client).values()) == [10]  # only the new version's vectors remain
    assert assert_ready(client)["index_size"] == 10
    for individual, body in {**made, 705: late}.items():
        answer = identify(client, jpeg(individual, 6))
        assert answer["model_version"] == new
        assert answer["best"]["individual_id"] == body["individual"]["id"]
    same = client.post("/species/dog/reload").json()
    assert same["status"] == "ready" and "already serving" in same["message"]


def test_restoring_the_old_model_while_the_new_one_swaps_in_reembeds_the_old_one(
    database_url: str,
    tmp_path: Path,
    artifacts,
    runner: AppRunner,  # noqa: ANN001
) -> None:
    """The new model's job activates it (dropping the old vectors) while a reload of the old model
    waits for the write lock: the old model must be re-embedded, not served from an empty index."""
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    client = runner.start(make_settings(database_url, tmp_path, models, reembed_batch_size=2))
    made = {i: enroll(client, i, range(2)) for i in range(720, 723)}
    old = client.get("/species/dog", headers=READ).json()["model_version"]
    runtime = client.app.state.runtime
    slot = runtime.registry.slot("dog")
    lock = slot.write_lock
    job_may_finish = threading.Event()
    reload_thread = threading.get_ident()
    interleaved: list[bool] = []

    def pause_the_job(session: Session) -> None:
        if threading.current_thread().name.startswith("reembed-"):
            assert job_may_finish.wait(60)  # the new model's job pauses after its first batch

    class JobFirstLock:
        """The slot's write lock. When the reload of the old model is about to take it, the new
        model's job goes first and ends, activating its version: the order of the race."""

        def __enter__(self) -> None:
            if threading.get_ident() == reload_thread and not interleaved:
                interleaved.append(True)
                job_may_finish.set()
                assert runtime.reembedder.wait("dog", timeout=60)
            lock.acquire()

        def __exit__(self, *exc: object) -> None:
            lock.release()

    event.listen(runtime.sessions, "after_commit", pause_the_job)
    slot.write_lock = JobFirstLock()  # type: ignore[assignment]
    try:
        make_models_dir(tmp_path, artifacts, dog="dog_v2")
        new = client.post("/species/dog/reload").json()["pending_model_version"]
        make_models_dir(tmp_path, artifacts, dog="dog")
        # What POST /species/dog/reload runs:
        result = reload_species(runtime.lifecycle, "dog", ANONYMOUS_ADMIN)
        assert interleaved and result.message.startswith("re-embedding 6 images"), result.message
        assert runtime.reembedder.wait("dog", timeout=60)
    finally:
        slot.write_lock = lock
        event.remove(runtime.sessions, "after_commit", pause_the_job)
    species = client.get("/species/dog", headers=READ).json()
    assert (species["status"], species["model_version"], species["pending_model_version"]) == (
        "ready",
        old,
        None,
    )
    assert assert_ready(client)["index_size"] == 6  # was 0, and /ready called that consistent
    assert dog_versions(client) == {old: "active", new: "retired"}
    for individual, body in made.items():
        assert identify(client, jpeg(individual, 6))["best"]["individual_id"] == body["individual"]["id"]


def test_a_failed_reembedding_is_reported_and_reloading_the_same_model_retries_it(
    database_url: str,
    tmp_path: Path,
    artifacts,
    runner: AppRunner,  # noqa: ANN001
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    client = runner.start(make_settings(database_url, tmp_path, models))
    made = enroll(client, 730, range(2))
    old = client.get("/species/dog", headers=READ).json()["model_version"]
    runtime = client.app.state.runtime
    with runtime.sessions() as session:
        image = Repository(session).images_of(uuid.UUID(made["individual"]["id"]))[0]
    path = runtime.store.absolute(image.storage_path)
    original = path.read_bytes()
    path.unlink()
    path.mkdir()  # unreadable, and not as a missing file the job skips: the job fails
    make_models_dir(tmp_path, artifacts, dog="dog_v2")

    new = client.post("/species/dog/reload").json()["pending_model_version"]
    assert runtime.reembedder.wait("dog", timeout=60)
    failed = client.get("/species/dog", headers=READ).json()
    assert (failed["status"], failed["model_version"], failed["pending_model_version"]) == (
        "ready",
        old,
        None,
    )
    assert new in failed["reason"] and "IsADirectoryError" not in failed["reason"]
    status = next(item for item in client.get("/status").json()["species"] if item["name"] == "dog")
    assert "IsADirectoryError" in status["detail"]  # the error itself: admin status only
    assert identify(client, jpeg(730, 6))["model_version"] == old  # the old model still serves

    make_models_dir(tmp_path, artifacts, dog="dog")  # going back to the serving model drops the failure
    back = client.post("/species/dog/reload").json()
    assert (back["status"], back["model_version"]) == ("ready", old), back["message"]
    assert client.get("/species/dog", headers=READ).json()["reason"] is None

    make_models_dir(tmp_path, artifacts, dog="dog_v2")
    path.rmdir()
    path.write_bytes(original)
    retry = client.post("/species/dog/reload").json()
    assert (retry["status"], retry["pending_model_version"]) == ("reindexing", new), retry["message"]
    assert runtime.reembedder.wait("dog", timeout=60)
    species = client.get("/species/dog", headers=READ).json()
    assert (species["status"], species["model_version"], species["reason"]) == ("ready", new, None)
    assert assert_ready(client)["index_size"] == 2
    assert identify(client, jpeg(730, 6))["best"]["individual_id"] == made["individual"]["id"]


def test_a_model_changed_while_stopped_is_reembedded_at_start(
    database_url: str,
    tmp_path: Path,
    artifacts,
    runner: AppRunner,  # noqa: ANN001
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    settings = make_settings(database_url, tmp_path, models)
    first = runner.start(settings)
    made = {i: enroll(first, i, range(2)) for i in range(800, 803)}
    runner.stop(first)
    make_models_dir(tmp_path, artifacts, dog="dog_v2")

    second = runner.start(settings)
    assert second.app.state.runtime.reembedder.wait("dog", timeout=60)
    species = second.get("/species/dog", headers=READ).json()
    assert species["status"] == "ready" and species["index_size"] == 6
    assert sorted(dog_versions(second).values()) == ["active", "retired"]
    assert_ready(second)
    for individual, body in made.items():
        assert identify(second, jpeg(individual, 4))["best"]["individual_id"] == body["individual"]["id"]
    with second.app.state.runtime.sessions() as session:
        entries = Repository(session).audit_entries()
    assert [e.action for e in entries] == ["enroll"] * 3  # re-embedding changes no individual


def test_a_stored_image_that_went_missing_does_not_stop_reembedding(
    database_url: str,
    tmp_path: Path,
    artifacts,
    runner: AppRunner,  # noqa: ANN001
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    settings = make_settings(database_url, tmp_path, models)
    first = runner.start(settings)
    made = enroll(first, 900, range(3))
    store = first.app.state.runtime.store
    with first.app.state.runtime.sessions() as session:
        lost = Repository(session).images_of(uuid.UUID(made["individual"]["id"]))[0]
    runner.stop(first)
    store.delete(lost.storage_path)
    make_models_dir(tmp_path, artifacts, dog="dog_v2")

    second = runner.start(settings)
    assert second.app.state.runtime.reembedder.wait("dog", timeout=60)
    species = second.get("/species/dog", headers=READ).json()
    assert species["status"] == "ready"
    assert (species["index_size"], species["images"]) == (
        2,
        3,
    )  # the unreadable image is reported, not served
    ready = second.get("/status").json()["species"][0]
    assert ready["consistent"] and ready["database_embeddings"] == 2
