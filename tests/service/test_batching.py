"""Dynamic batching: concurrent requests share forward passes and index searches, with the results
they would get alone."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from apps import ADMIN, READ, TestClient, make_settings
from imagegen import jpeg
from test_index import entries_for, unit

from service.app import create_app
from service.ml.batching import BatchingConfig, EmbedBatcher, MicroBatcher, SearchBatcher
from service.ml.embedder import Embedder
from service.ml.gallery import Candidate, Gallery
from service.ml.images import ImagePolicy, decode_image
from service.ml.registry import Registry
from service.runtime import Runtime
from service.settings import Settings
from training.artifact import load_artifact

# Long enough that every thread of a test has queued before the first batch leaves, even on a
# loaded 2-core machine; a batch also leaves as soon as it is full.
GATHER = BatchingConfig(max_wait_s=2.0, max_items=8)

# Decode limits that let every test photo through whole.
LOOSE = ImagePolicy(max_pixels=10**8, max_request_pixels=10**8)


def concurrently(count: int, work: Callable[[int], object]) -> list[object]:
    """Run ``work(i)`` for i < count in as many threads, released together."""
    start = threading.Barrier(count)

    def run(i: int) -> object:
        start.wait()
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_jobs_run_in_one_call_and_each_gets_its_own_results() -> None:
    calls: list[list[list[int]]] = []

    def double(jobs: list[list[int]]) -> list[list[int]]:
        calls.append(jobs)
        return [[2 * x for x in job] for job in jobs]

    batcher: MicroBatcher[list[int], list[int]] = MicroBatcher(double, GATHER)
    results = concurrently(4, lambda i: batcher.submit([i, 10 + i], 2))
    assert results == [[2 * i, 20 + 2 * i] for i in range(4)]
    assert len(calls) == 1 and batcher.stats.sizes == [8]  # full at 8 items: left without waiting 2 s


def test_batches_never_exceed_max_items_and_keep_arrival_order() -> None:
    seen: list[list[int]] = []

    def identity(jobs: list[int]) -> list[int]:
        seen.append(list(jobs))
        return jobs

    batcher: MicroBatcher[int, int] = MicroBatcher(identity, BatchingConfig(max_wait_s=0.05, max_items=3))
    assert sorted(concurrently(10, lambda i: batcher.submit(i, 1))) == list(range(10))  # type: ignore[type-var]
    assert all(len(batch) <= 3 for batch in seen)
    assert sum(len(batch) for batch in seen) == 10 == batcher.stats.items


def test_a_job_larger_than_a_batch_runs_alone() -> None:
    batcher: MicroBatcher[list[int], int] = MicroBatcher(
        lambda jobs: [len(j) for j in jobs], BatchingConfig(0.01, 2)
    )
    assert batcher.submit([1, 2, 3, 4, 5], 5) == 5
    assert batcher.stats.sizes == [5]


@pytest.mark.parametrize("lanes", [1, 2])
def test_lanes_let_that_many_batches_run_at_once(lanes: int) -> None:
    # Each job fills a batch of its own (2 items of at most 2); a batch waits until two batches are inside the
    # call at the same time. Two lanes let both in; one lane never does.
    both_inside = threading.Barrier(2)

    def meet(jobs: list[int]) -> list[bool]:
        try:
            both_inside.wait(timeout=1.0)
        except threading.BrokenBarrierError:
            return [False for _ in jobs]
        return [True for _ in jobs]

    batcher: MicroBatcher[int, bool] = MicroBatcher(meet, BatchingConfig(0.001, 2, lanes=lanes))
    results = concurrently(2, lambda i: batcher.submit(i, 2))
    assert results == ([True, True] if lanes == 2 else [False, False])
    assert batcher.stats.sizes == [2, 2]


def test_with_two_lanes_every_job_is_answered_once_with_its_own_result() -> None:
    calls: list[list[int]] = []
    lock = threading.Lock()

    def square(jobs: list[int]) -> list[int]:
        with lock:
            calls.append(jobs)
        return [x * x for x in jobs]

    batcher: MicroBatcher[int, int] = MicroBatcher(square, BatchingConfig(0.002, 4, lanes=2))
    assert concurrently(24, lambda i: batcher.submit(i, 1)) == [i * i for i in range(24)]
    assert sorted(x for call in calls for x in call) == list(range(24))
    assert all(len(call) <= 4 for call in calls)


def test_a_backlog_is_split_over_the_lanes() -> None:
    # 8 jobs queued at once (max_items 8, so the batch is due at once): with two lanes the first
    # batch takes its half and a second leader takes the rest while the first still runs.
    sizes: list[int] = []
    lock = threading.Lock()

    def record(jobs: list[int]) -> list[int]:
        with lock:
            sizes.append(len(jobs))
        time.sleep(0.2)
        return jobs

    batcher: MicroBatcher[int, int] = MicroBatcher(record, BatchingConfig(2.0, 8, lanes=2))
    assert concurrently(8, lambda i: batcher.submit(i, 1)) == list(range(8))
    assert sorted(sizes) == [4, 4]


def test_started_when_idle_a_lone_job_runs_at_once_and_jobs_gather_while_a_batch_runs() -> None:
    # A wait of a minute: only starting when idle lets the first job leave. The next three arrive
    # while it runs and leave together as soon as it is done, again without the wait.
    first_running, release = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def hold_first(jobs: list[int]) -> list[int]:
        seen.append(list(jobs))
        if jobs == [0]:
            first_running.set()
            assert release.wait(timeout=30)
        return jobs

    config = BatchingConfig(max_wait_s=60.0, max_items=8, start_when_idle=True)
    batcher: MicroBatcher[int, int] = MicroBatcher(hold_first, config)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, 0, 1)
        assert first_running.wait(timeout=30)
        rest = [pool.submit(batcher.submit, i, 1) for i in (1, 2, 3)]
        while batcher._queued < 3:  # all three queued behind the running batch
            time.sleep(0.01)
        release.set()
        assert first.result(timeout=30) == 0
        assert [f.result(timeout=30) for f in rest] == [1, 2, 3]
    assert seen == [[0], [1, 2, 3]] and batcher.stats.sizes == [1, 3]


def test_a_failed_batch_fails_each_of_its_jobs_and_the_next_batch_runs() -> None:
    def fail_on_seven(jobs: list[int]) -> list[int]:
        if 7 in jobs:
            raise ValueError("seven")
        return jobs

    batcher: MicroBatcher[int, int] = MicroBatcher(fail_on_seven, GATHER)

    def submit(i: int) -> object:
        try:
            return batcher.submit(7 if i == 0 else i, 1)
        except ValueError as exc:
            return str(exc)

    assert concurrently(3, submit) == ["seven", "seven", "seven"]  # one batch of three
    assert batcher.submit(3, 1) == 3


def test_disabled_batching_runs_every_job_alone() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda jobs: jobs, BatchingConfig(max_wait_s=0.0))
    assert concurrently(4, lambda i: batcher.submit(i, 1)) == [0, 1, 2, 3]
    assert batcher.stats.sizes == [1, 1, 1, 1]


def assert_same_candidates(got: list[list[Candidate]], want: list[list[Candidate]]) -> None:
    """Same individuals and images in the same order; similarities up to float rounding (one BLAS
    product for a batch, FAISS's SIMD loop for a single query)."""
    assert [[(c.individual_id, c.image_id) for c in row] for row in got] == [
        [(c.individual_id, c.image_id) for c in row] for row in want
    ]
    for got_row, want_row in zip(got, want, strict=True):
        np.testing.assert_allclose(
            [c.similarity for c in got_row], [c.similarity for c in want_row], atol=1e-5
        )


def test_batched_gallery_searches_equal_single_searches() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 40, size=800)
    entries, _ = entries_for(labels)
    gallery = Gallery(32, use_gpu=False)
    gallery.add(range(800), unit(rng, 800, 32), entries)
    queries = unit(rng, 8, 32)
    top_ks = [1, 3, 5, 40, 2, 10, 60, 7]  # 60 > 40 individuals: the whole gallery is ranked

    alone = [gallery.search_individuals(q, k) for q, k in zip(queries, top_ks, strict=True)]
    assert_same_candidates(gallery.search_individuals_many(queries, top_ks), alone)
    batcher = SearchBatcher(gallery, GATHER)
    together = concurrently(8, lambda i: batcher.search_individuals(queries[i], top_ks[i]))
    assert_same_candidates(together, alone)  # type: ignore[arg-type]
    assert batcher.stats.sizes == [8]


@pytest.fixture
def batched_settings(database_url: str, service_root: Path) -> Settings:
    return make_settings(
        database_url,
        service_root,
        service_root / "models",
        batch_wait_ms=GATHER.max_wait_s * 1000,
        batch_max_images=GATHER.max_items,
        search_batch_wait_ms=GATHER.max_wait_s * 1000,
        search_batch_max_queries=GATHER.max_items,
        batch_lanes=1,  # one lane: the 8 requests share one pass (lanes have tests of their own)
        batch_start="after-wait",  # all of them gathered, none sent ahead alone while the pass is idle
        batch_min_speedup=0.0,  # every model batched, whatever its measured speed-up
    )


def test_a_model_slower_per_image_in_a_batch_is_not_batched(artifacts: dict[str, Path]) -> None:
    registry = Registry(
        device=torch.device("cpu"), use_gpu_index=False, embed_batching=replace(GATHER, min_speedup=1.2)
    )
    images = [decode_image(jpeg(800 + i, i % 3), LOOSE).image for i in range(6)]
    for speedup, sizes in ((0.6, [1] * 6), (1.2, [6]), (None, [6])):  # None: not measured
        embedder = Embedder(load_artifact(artifacts["dog"], "cpu"), torch.device("cpu"))
        embedder.batch_speedup = speedup
        together = concurrently(6, lambda i, e=embedder: registry.embed("dog", e, [images[i]])[0])
        assert registry.embed_batcher("dog", embedder).stats.sizes == sizes
        np.testing.assert_allclose(np.stack(together), embedder.embed(images), atol=1e-4)  # type: ignore[arg-type]


@pytest.mark.parametrize("min_speedup", [1.2, 0.0])
def test_loading_a_model_measures_its_speedup_when_batching_depends_on_it(
    min_speedup: float, settings: Settings
) -> None:
    assert Settings.model_fields["batch_min_speedup"].default == 1.2
    with TestClient(
        create_app(settings.model_copy(update={"batch_min_speedup": min_speedup})), headers=ADMIN
    ) as client:
        registry = client.app.state.runtime.registry  # type: ignore[attr-defined]
        embedder = registry.serving("dog").embedder
        assert registry.embed_batching.max_items == 8  # the CPU's batch
        if min_speedup:
            assert embedder.batch_speedup is not None and embedder.batch_speedup > 0
        else:
            assert embedder.batch_speedup is None
        batcher = registry.embed_batcher("dog", embedder)
        assert batcher.config == registry.embed_batching.for_model(embedder.batch_speedup)


@pytest.mark.parametrize("start", ["when-idle", "after-wait"])
def test_the_batch_start_setting_reaches_both_batchers(start: str, settings: Settings) -> None:
    assert Settings.model_fields["batch_start"].default == "when-idle"
    with TestClient(create_app(settings.model_copy(update={"batch_start": start})), headers=ADMIN) as client:
        registry = client.app.state.runtime.registry  # type: ignore[attr-defined]
        when_idle = start == "when-idle"
        assert (
            registry.embed_batching.start_when_idle is registry.search_batching.start_when_idle is when_idle
        )


def test_concurrent_identify_requests_share_forward_passes_with_unbatched_results(
    batched_settings: Settings, settings: Settings
) -> None:
    queries = [jpeg(300 + i, 5) for i in range(8)]

    def identify(client: TestClient, i: int) -> dict:
        response = client.post(
            "/identify",
            data={"species": "dog", "top_k": "3"},
            files={"image": ("q.jpg", queries[i], "image/jpeg")},
            headers=READ,
        )
        assert response.status_code == 200, response.text
        return response.json()

    def enroll_gallery(client: TestClient) -> None:
        for i in range(300, 306):
            files = [("images", (f"{s}.jpg", jpeg(i, s), "image/jpeg")) for s in range(2)]
            response = client.post("/enroll", data={"species": "dog", "external_id": f"dog-{i}"}, files=files)
            assert response.status_code == 201, response.text

    # Unbatched: the same database, an app with batching off (settings' default is on, so turn it off).
    unbatched = settings.model_copy(update={"batch_wait_ms": 0.0, "search_batch_wait_ms": 0.0})
    with TestClient(create_app(unbatched), headers=ADMIN) as client:
        enroll_gallery(client)
        alone = [identify(client, i) for i in range(len(queries))]
        runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        serving = runtime.registry.serving("dog")
        assert set(runtime.registry.embed_batcher("dog", serving.embedder).stats.sizes) == {1, 2}

    with TestClient(create_app(batched_settings), headers=ADMIN) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        serving = runtime.registry.serving("dog")
        embeds = runtime.registry.embed_batcher("dog", serving.embedder).stats
        searches = runtime.registry.search_batcher("dog", serving.gallery).stats
        before = embeds.calls
        together = concurrently(len(queries), lambda i: identify(client, i))
        metrics = client.get("/metrics").text

    assert embeds.calls - before == 1 and embeds.sizes[-1] == 8  # one forward pass for 8 requests
    assert searches.calls == 1 and searches.sizes == [8]  # and one index search
    assert 'animalid_batch_items_count{operation="embed",species="dog"}' in metrics
    for one, other in zip(alone, together, strict=True):
        assert [c["individual_id"] for c in one["candidates"]] == [
            c["individual_id"] for c in other["candidates"]
        ]
        np.testing.assert_allclose(
            [c["similarity"] for c in one["candidates"]],
            [c["similarity"] for c in other["candidates"]],
            atol=1e-4,
        )
        assert one["decision"] == other["decision"]


def test_concurrent_enrolls_and_verifies_are_batched_and_stored_like_single_ones(
    batched_settings: Settings,
) -> None:
    with TestClient(create_app(batched_settings), headers=ADMIN) as client:
        runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        serving = runtime.registry.serving("dog")
        stats = runtime.registry.embed_batcher("dog", serving.embedder).stats
        before = stats.calls

        def enroll(i: int) -> dict:
            files = [("images", (f"{s}.jpg", jpeg(400 + i, s), "image/jpeg")) for s in range(2)]
            response = client.post("/enroll", data={"species": "dog", "external_id": f"e{i}"}, files=files)
            assert response.status_code == 201, response.text
            return response.json()

        enrolled = concurrently(4, enroll)
        assert stats.calls - before == 1 and stats.sizes[-1] == 8  # four requests of two images

        # The stored vectors are those of an unbatched forward pass of each image.
        ids, vectors = serving.gallery.snapshot()
        assert len(ids) == 8
        want = serving.embedder.embed(
            [decode_image(jpeg(400 + i, s), LOOSE).image for i in range(4) for s in range(2)]
        )
        np.testing.assert_allclose(np.max(vectors @ want.T, axis=0), 1.0, atol=1e-4)

        def verify(i: int) -> float:
            individual = enrolled[i]["individual"]["id"]
            response = client.post(
                "/verify",
                data={"species": "dog", "individual_id": str(uuid.UUID(individual))},
                files={"image": ("q.jpg", jpeg(400 + i, 0), "image/jpeg")},
                headers=READ,
            )
            assert response.status_code == 200, response.text
            return float(response.json()["similarity"])

        before = stats.calls
        similarities = concurrently(4, verify)
        assert stats.calls - before == 1 and stats.sizes[-1] == 4
        assert all(s == pytest.approx(1.0, abs=1e-4) for s in similarities)  # an enrolled photo again


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_batched_forward_passes_equal_single_ones_on_each_device(
    device: str, artifacts: dict[str, Path], ieee_fp32: None
) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    embedder = Embedder(load_artifact(artifacts["dog"], device), torch.device(device))
    images = [decode_image(jpeg(900 + i, i % 3), LOOSE).image for i in range(6)]
    alone = [embedder.embed([image])[0] for image in images]
    batcher = EmbedBatcher(embedder, GATHER)
    together = concurrently(6, lambda i: batcher.embed([images[i]])[0])
    assert batcher.stats.sizes == [6]
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-4)  # type: ignore[arg-type]
