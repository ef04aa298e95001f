"""SIGKILL in the middle of enrolls: the restarted server is consistent and lost nothing it acknowledged."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apps import ADMIN, make_models_dir
from imagegen import jpeg
from servers import Server


@pytest.fixture
def server(database_url: str, tmp_path: Path, artifacts: dict[str, Path]) -> Iterator[Server]:
    running = Server(database_url, tmp_path, make_models_dir(tmp_path, artifacts, dog="dog"))
    yield running
    running.stop()


def test_sigkill_during_enrolls_loses_nothing_acknowledged(server: Server) -> None:
    server.start()
    acknowledged: list[tuple[str, str, str, bytes]] = []  # external id, individual id, image id, bytes
    lock = threading.Lock()
    stop = threading.Event()

    def enroller(worker: int) -> None:
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as http:
            for n in range(1000):
                if stop.is_set():
                    return
                ext, data = f"crash-{worker}-{n}", jpeg(1000 + 100 * worker + n)
                try:
                    response = http.post(
                        "/enroll", data={"species": "dog", "external_id": ext}, files={"images": data}
                    )
                except httpx.TransportError:
                    return  # the server died mid-request: not acknowledged
                if response.status_code == 201:
                    body = response.json()
                    with lock:
                        acknowledged.append(
                            (ext, body["individual"]["id"], body["images"][0]["image_id"], data)
                        )

    workers = [threading.Thread(target=enroller, args=(w,)) for w in range(3)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 12:
        assert time.monotonic() < deadline, "enrolls too slow"
        time.sleep(0.02)
    server.kill()  # SIGKILL while the workers still have requests in flight
    stop.set()
    for worker in workers:
        worker.join(60)
    assert len(acknowledged) >= 12

    server.start()
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as http:
        ready = http.get("/status").json()
        dog = next(item for item in ready["species"] if item["name"] == "dog")
        assert ready["ready"] and dog["consistent"]
        assert dog["index_size"] == dog["database_embeddings"] == dog["database_images"] >= len(acknowledged)
        for ext, individual_id, image_id, data in acknowledged:
            listed = http.get("/individuals", params={"external_id": ext}).json()
            assert [item["id"] for item in listed["data"]] == [individual_id], ext
            stored = http.get(f"/individuals/{individual_id}/images/{image_id}/file")
            assert stored.status_code == 200 and stored.content == data
            found = http.post(
                "/identify", data={"species": "dog", "top_k": "1"}, files={"image": data}
            ).json()
            assert found["best"]["individual_id"] == individual_id  # every acknowledged photo finds itself
            assert found["best"]["similarity"] == pytest.approx(1.0, abs=1e-4)
