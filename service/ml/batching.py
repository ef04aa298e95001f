"""Dynamic batching: the work of concurrent requests gathered into one call.

Requests run in worker threads (sync routes). Each hands its items to a :class:`MicroBatcher` and
blocks. A waiting thread leads when fewer than ``lanes`` threads lead: it waits until the oldest
queued job is ``max_wait_s`` old or ``max_items`` items are queued, takes jobs in arrival order up
to ``max_items`` items, with several lanes at most its share of the queue among the idle lanes (a
single job larger than that goes alone), runs them in one call, and hands every job its share of
the results. It keeps leading until its own job is done, then passes the lead on. With more than
one lane, batches run side by side: on a CPU whose forward pass uses one thread, one lane would
leave the other cores idle while a batch runs (measured: 8 clients got half the throughput of
unbatched requests on 2 cores, docs/benchmarks.md). No thread of its own runs, so there is nothing
to start or stop, and a request alone waits at most ``max_wait_s`` (not at all when batches start
while the device is idle, ``BatchingConfig.start_when_idle``).

:class:`EmbedBatcher` applies this to one embedder's forward passes (preprocessing stays in the
caller's thread; tensors are concatenated, on whatever device the model is on), and
:class:`SearchBatcher` to one gallery's searches. Both are model- and index-agnostic: they only
call ``Embedder.batch``/``Embedder.embed_tensor`` and ``Gallery.search_individuals_many``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from service.ml.embedder import Embedder
from service.ml.gallery import Candidate, Gallery

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class BatchingConfig:
    """``max_wait_s`` 0 turns batching off: every call runs alone, at once. ``lanes``: batches that
    may run at the same time. ``start_when_idle``: while no batch runs, the queued jobs leave at
    once instead of waiting out ``max_wait_s``; the jobs that arrive while a batch runs gather for
    the next one. With one lane a batch never waits: a request alone is not slowed at all, and
    under load batches are as large as what arrived during the last one (the service's default:
    on a GPU a lone request's forward pass is a fraction of the wait, docs/benchmarks.md)."""

    max_wait_s: float = 0.0
    max_items: int = 32
    lanes: int = 1
    start_when_idle: bool = False
    # Forward passes only: a model whose batch of max_items runs at fewer than this many times the
    # images per second of a batch of one (Embedder.batch_speedup, measured at start-up) is not
    # batched; 0: every model is.
    min_speedup: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0 and self.max_items > 1

    def for_model(self, speedup: float | None) -> BatchingConfig:
        """This configuration for a model whose batch runs ``speedup`` times the images per second
        of a batch of one (None: not measured): batching off when that is below ``min_speedup``."""
        if speedup is None or speedup >= self.min_speedup:
            return self
        return replace(self, max_wait_s=0.0)


@dataclass
class BatchStats:
    """What a batcher ran: calls (batches) and the items in each, for tests and metrics."""

    calls: int = 0
    items: int = 0
    sizes: list[int] = field(default_factory=list)
    keep: int = 1000  # the most recent batch sizes kept

    def record(self, size: int) -> None:
        self.calls += 1
        self.items += size
        self.sizes.append(size)
        if len(self.sizes) > self.keep:
            del self.sizes[: len(self.sizes) - self.keep]


class _Job(Generic[In, Out]):
    __slots__ = ("items", "size", "enqueued", "due", "results", "error", "done")

    def __init__(self, items: In, size: int) -> None:
        self.items = items
        self.size = size
        self.enqueued = time.perf_counter()
        self.due = False  # left over from a due backlog that was split over lanes: runs at once
        self.results: Out | None = None
        self.error: BaseException | None = None
        self.done = False


class MicroBatcher(Generic[In, Out]):
    """``run(jobs' items) -> one result per job``, called with the jobs of concurrent ``submit``s."""

    def __init__(
        self,
        run: Callable[[list[In]], list[Out]],
        config: BatchingConfig,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self.config = config
        self.stats = BatchStats()
        self._on_batch = on_batch
        self._queue: deque[_Job[In, Out]] = deque()
        self._queued = 0  # items in the queue
        self._leaders = 0  # threads leading now, at most config.lanes
        self._running = 0  # batches running now
        self._cond = threading.Condition()

    def submit(self, items: In, size: int) -> Out:
        """Block until ``items`` ran (alone or with others' items); their result, or their error."""
        if not self.config.enabled:
            (result,) = self._run([items])
            with self._cond:
                self._record(size)
            return result
        job: _Job[In, Out] = _Job(items, size)
        with self._cond:
            self._queue.append(job)
            self._queued += size
            # Wake the leaders when they have something to do: work for one waiting on an empty
            # queue, or a full batch for one waiting out the deadline of the first job.
            if len(self._queue) == 1 or self._queued >= self.config.max_items:
                self._cond.notify_all()
            while not job.done and self._leaders >= max(1, self.config.lanes):
                self._cond.wait()
            if job.done:
                return self._result(job)
            self._leaders += 1
        try:
            while self._lead_one_batch(job):
                pass
        finally:
            with self._cond:
                self._leaders -= 1
                self._cond.notify_all()
        return self._result(job)

    @staticmethod
    def _result(job: _Job[In, Out]) -> Out:
        if job.error is not None:
            raise job.error
        assert job.results is not None
        return job.results

    def _record(self, size: int) -> None:
        self.stats.record(size)
        if self._on_batch is not None:
            self._on_batch(size)

    def _lead_one_batch(self, mine: _Job[In, Out]) -> bool:
        """Run the next batch once it is due; False when ``mine`` is done (another lane may have
        run it) and the caller stops leading."""
        with self._cond:
            while True:
                if mine.done:
                    return False
                if not self._queue:  # every queued job is in another lane's batch
                    self._cond.wait()
                    continue
                remaining = self._queue[0].enqueued + self.config.max_wait_s - time.perf_counter()
                idle = self.config.start_when_idle and self._running == 0
                if self._queued >= self.config.max_items or remaining <= 0 or self._queue[0].due or idle:
                    break
                self._cond.wait(remaining)
            # With several lanes, a batch takes its share of the queue among the lanes not running
            # one, so a backlog is split over them instead of one lane taking it all.
            idle_lanes = max(1, self.config.lanes - self._running)
            limit = min(self.config.max_items, -(-self._queued // idle_lanes))
            batch = [self._queue.popleft()]
            taken = batch[0].size
            while self._queue and taken + self._queue[0].size <= limit:
                job = self._queue.popleft()
                batch.append(job)
                taken += job.size
            self._queued -= taken
            self._running += 1
            self._record(taken)
            if self._queue:  # the rest of a due backlog is due too: another lane takes it now
                for job in self._queue:
                    job.due = True
                self._cond.notify_all()
        try:
            results = self._run([job.items for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} jobs gave {len(results)} results")
        except BaseException as exc:  # every job of the batch sees the failure, as if it ran alone
            with self._cond:
                self._running -= 1
                for job in batch:
                    job.error, job.done = exc, True
                self._cond.notify_all()
            return True
        with self._cond:
            self._running -= 1
            for job, result in zip(batch, results, strict=True):
                job.results, job.done = result, True
            self._cond.notify_all()
        return True


class EmbedBatcher:
    """One embedder's forward passes, shared by concurrent identify, verify and enroll requests."""

    def __init__(
        self, embedder: Embedder, config: BatchingConfig, on_batch: Callable[[int], None] | None = None
    ) -> None:
        self.embedder = embedder
        self._batcher: MicroBatcher[torch.Tensor, np.ndarray] = MicroBatcher(self._forward, config, on_batch)

    @property
    def config(self) -> BatchingConfig:
        return self._batcher.config

    @property
    def stats(self) -> BatchStats:
        return self._batcher.stats

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float32 unit rows, the same as ``Embedder.embed`` gives for these images."""
        if not images:
            return np.empty((0, self.embedder.dim), dtype=np.float32)
        return self._batcher.submit(self.embedder.batch(images), len(images))

    def _forward(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        vectors = self.embedder.embed_tensor(torch.cat(tensors) if len(tensors) > 1 else tensors[0])
        bounds = np.cumsum([len(t) for t in tensors])[:-1]
        return list(np.split(vectors, bounds))


class SearchBatcher:
    """One gallery's searches, shared by concurrent identify requests."""

    def __init__(
        self, gallery: Gallery, config: BatchingConfig, on_batch: Callable[[int], None] | None = None
    ) -> None:
        self.gallery = gallery
        self._batcher: MicroBatcher[tuple[np.ndarray, int], list[Candidate]] = MicroBatcher(
            self._search, config, on_batch
        )

    @property
    def stats(self) -> BatchStats:
        return self._batcher.stats

    def search_individuals(self, query: np.ndarray, top_k: int) -> list[Candidate]:
        """The same as ``Gallery.search_individuals(query, top_k)``."""
        if top_k <= 0:
            raise ValueError("top_k must be positive")
        return self._batcher.submit((query, top_k), 1)

    def _search(self, jobs: list[tuple[np.ndarray, int]]) -> list[list[Candidate]]:
        queries = np.stack([np.asarray(query, dtype=np.float32).reshape(-1) for query, _ in jobs])
        return self.gallery.search_individuals_many(queries, [top_k for _, top_k in jobs])
