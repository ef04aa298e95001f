"""Two real API processes on one Postgres database keep their indexes in step.

Each server is `python -m service.cli serve` on its own free loopback port. What one process
writes (enroll, delete, merge) becomes searchable, or gone, on the other through LISTEN/NOTIFY and
the change sequence; a process killed in the middle of an enroll leaves the other consistent with
the database.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from apps import ADMIN_KEY, make_models_dir
from databases import provisioned_database
from imagegen import jpeg
from test_crash import Server

FOLLOW_TIMEOUT_S = 15.0  # generous for a loaded 2-core box; the design target is under a second

pytestmark = pytest.mark.postgres


class Replica:
    """One API process (``animalid serve``, as in test_crash) and a client for it."""

    def __init__(self, url: str, root: Path) -> None:
        self.server = Server(url, root, root / "models")
        self.server.env["ANIMALID_INDEX_FOLLOW_POLL_S"] = "0.5"
        self.server.start()
        assert self.server.process is not None
        self.process = self.server.process
        self.http = httpx.Client(base_url=self.server.url, headers={"x-api-key": ADMIN_KEY}, timeout=60)

    def stop(self) -> None:
        self.http.close()
        self.server.stop()

    def enroll(self, individual: int, shots: range = range(2)) -> dict:
        files = [("images", (f"{s}.jpg", jpeg(individual, s), "image/jpeg")) for s in shots]
        response = self.http.post(
            "/enroll", data={"species": "dog", "external_id": f"r{individual}"}, files=files
        )
        assert response.status_code == 201, response.text
        return response.json()

    def top(self, individual: int) -> str | None:
        """The best candidate's id for a photo of ``individual`` already enrolled, None when empty."""
        response = self.http.post(
            "/identify",
            data={"species": "dog", "top_k": "1"},
            files={"image": ("q.jpg", jpeg(individual, 0), "image/jpeg")},
        )
        assert response.status_code == 200, response.text
        candidates = response.json()["candidates"]
        return candidates[0]["individual_id"] if candidates else None

    def dog_readiness(self) -> dict:
        body = self.http.get("/status").json()
        return next(s for s in body["species"] if s["name"] == "dog")


def eventually(check: Callable[[], bool], what: str) -> float:
    """Seconds until ``check()`` held, polling; fails after FOLLOW_TIMEOUT_S."""
    start = time.monotonic()
    while time.monotonic() - start < FOLLOW_TIMEOUT_S:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    pytest.fail(f"not within {FOLLOW_TIMEOUT_S} s: {what}")


@pytest.fixture
def pair(tmp_path: Path, artifacts: dict[str, Path]) -> Iterator[tuple[Replica, Replica]]:
    make_models_dir(tmp_path, artifacts, dog="dog")
    with provisioned_database("postgres", tmp_path) as url:
        replicas: list[Replica] = []
        try:
            replicas.append(Replica(url, tmp_path))
            replicas.append(Replica(url, tmp_path))
            yield replicas[0], replicas[1]
        finally:
            for replica in replicas:
                replica.stop()


def test_writes_on_one_process_are_followed_by_the_other(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    first = a.enroll(600)["individual"]["id"]
    eventually(lambda: b.top(600) == first, "an enroll on A is found on B")

    b.http.delete(f"/individuals/{first}").raise_for_status()
    eventually(lambda: a.top(600) != first, "a delete on B is gone on A")
    assert a.top(600) is None  # the only individual

    keep, other = a.enroll(601)["individual"]["id"], a.enroll(602)["individual"]["id"]
    eventually(lambda: b.top(602) == other, "a second enroll on A is found on B")
    b.http.post(f"/individuals/{keep}/merge", json={"source_id": other}).raise_for_status()
    eventually(lambda: a.top(602) == keep, "a merge on B moves the images on A")
    for replica in (a, b):
        state = replica.dog_readiness()
        assert state["consistent"] and state["index_size"] == state["database_embeddings"] == 4


def test_a_process_killed_mid_enroll_leaves_the_other_consistent(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    b.enroll(700)
    outcome: list[object] = []

    def big_enroll() -> None:
        try:
            outcome.append(a.enroll(701, range(16)))
        except (httpx.HTTPError, AssertionError) as exc:
            outcome.append(exc)

    writer = threading.Thread(target=big_enroll)
    writer.start()
    time.sleep(0.3)  # the request is in flight: decoding, embedding or committing
    a.process.send_signal(signal.SIGKILL)
    writer.join(60)
    a.process.wait(10)

    def consistent() -> bool:
        state = b.dog_readiness()
        return bool(state["consistent"]) and state["index_size"] == state["database_embeddings"]

    eventually(consistent, "B's index equals the database after A died")
    state = b.dog_readiness()
    assert state["database_embeddings"] in (2, 2 + 16)  # all of the enroll or none of it
    if state["database_embeddings"] == 18:
        assert b.top(701) is not None
