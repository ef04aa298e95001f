"""A species' searchable gallery: the vector index plus which image and individual each vector is.

Searches return individuals, never the same one twice: each candidate carries its best score
(the maximum over its images) and the image that produced it.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.ml.ann import IndexPlan
from service.ml.index import VectorIndex

# First search asks for this many neighbours per requested individual; it grows until enough
# distinct individuals are seen or the whole gallery has been ranked.
OVERFETCH = 4


@dataclass(frozen=True)
class GalleryEntry:
    image_id: uuid.UUID
    individual_id: uuid.UUID


@dataclass(frozen=True)
class Candidate:
    individual_id: uuid.UUID
    image_id: uuid.UUID
    embedding_id: int
    similarity: float


class Gallery:
    def __init__(self, dim: int, use_gpu: bool | None = None) -> None:
        self.dim = dim
        self._index = VectorIndex(dim, use_gpu=use_gpu)
        self._entries: dict[int, GalleryEntry] = {}
        # images per individual, and how many individuals have each count (the open-set table reads
        # a gallery by both: see ``OpenSetCalibration.equivalent_size``)
        self._images_of: Counter[uuid.UUID] = Counter()
        self._individuals_with: Counter[int] = Counter()
        self._lock = threading.RLock()

    @property
    def on_gpu(self) -> bool:
        return self._index.on_gpu

    @property
    def approximate(self) -> bool:
        return self._index.approximate

    def set_plan(self, plan: IndexPlan) -> None:
        """Exact or approximate search by size from now on (see :class:`service.ml.ann.IndexPlan`)."""
        with self._lock:
            self._index.set_plan(plan)

    def __len__(self) -> int:
        with self._lock:
            return self._index.ntotal

    def __contains__(self, embedding_id: int) -> bool:
        with self._lock:
            return embedding_id in self._index

    def add(self, embedding_ids: Iterable[int], vectors: np.ndarray, entries: Iterable[GalleryEntry]) -> None:
        ids = np.fromiter((int(i) for i in embedding_ids), dtype=np.int64)
        entry_list = list(entries)
        if len(entry_list) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(entry_list)} entries")
        with self._lock:
            self._index.add(ids, vectors)
            for i, entry in zip(ids, entry_list, strict=True):
                self._set_entry(int(i), entry)

    def remove(self, embedding_ids: Iterable[int]) -> int:
        ids = np.fromiter((int(i) for i in embedding_ids), dtype=np.int64)
        with self._lock:
            removed = self._index.remove(ids)
            for i in ids:
                self._set_entry(int(i), None)
            return removed

    def entry(self, embedding_id: int) -> GalleryEntry | None:
        """Which image and individual a stored vector is, None when the index lacks it."""
        with self._lock:
            return self._entries.get(int(embedding_id))

    def reassign(self, embedding_ids: Iterable[int], individual_id: uuid.UUID) -> None:
        """Point vectors at another individual (after a merge); the vectors themselves are unchanged."""
        with self._lock:
            for i in embedding_ids:
                entry = self._entries[int(i)]
                self._set_entry(int(i), GalleryEntry(image_id=entry.image_id, individual_id=individual_id))

    def image_counts(self) -> dict[int, int]:
        """{images per individual: individuals with that many}, over the whole gallery."""
        with self._lock:
            return dict(self._individuals_with)

    def _set_entry(self, embedding_id: int, entry: GalleryEntry | None) -> None:
        """Store (or, with None, drop) what a vector is, keeping the per-individual counts."""
        old = self._entries.pop(embedding_id, None)
        if old is not None:
            self._count(old.individual_id, -1)
        if entry is not None:
            self._entries[embedding_id] = entry
            self._count(entry.individual_id, +1)

    def _count(self, individual_id: uuid.UUID, change: int) -> None:
        before = self._images_of[individual_id]
        after = before + change
        if before:
            self._individuals_with[before] -= 1
            if not self._individuals_with[before]:
                del self._individuals_with[before]
        if after:
            self._images_of[individual_id] = after
            self._individuals_with[after] += 1
        else:
            del self._images_of[individual_id]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) in storage order, for consistency checks and tests."""
        with self._lock:
            return self._index.ids().copy(), self._index.vectors()

    def search_individuals(self, query: np.ndarray, top_k: int) -> list[Candidate]:
        """The ``top_k`` most similar individuals, best first, each with its best-matching image."""
        return self.search_individuals_many(np.asarray(query, dtype=np.float32).reshape(1, -1), [top_k])[0]

    def search_individuals_many(self, queries: np.ndarray, top_ks: list[int]) -> list[list[Candidate]]:
        """:meth:`search_individuals` for each row of ``queries``, with one index search per round
        for all of them (one BLAS product on the CPU instead of a scan per query)."""
        if len(top_ks) != len(queries):
            raise ValueError(f"{len(queries)} queries for {len(top_ks)} top_k values")
        if any(top_k <= 0 for top_k in top_ks):
            raise ValueError("top_k must be positive")
        results: list[list[Candidate]] = [[] for _ in top_ks]
        with self._lock:
            total = self._index.ntotal
            wanted = {i: min(total, top_k * OVERFETCH) for i, top_k in enumerate(top_ks) if total}
            while wanted:
                rows = sorted(wanted)
                scores, ids = self._index.search(queries[rows], max(wanted.values()))
                for row, row_scores, row_ids in zip(rows, scores, ids, strict=True):
                    best = self._distinct(row_scores, row_ids, top_ks[row])
                    if len(best) == top_ks[row] or len(row_ids) >= total:
                        results[row] = best
                        del wanted[row]
                    else:
                        wanted[row] = min(total, wanted[row] * OVERFETCH)
        return results

    def _distinct(self, scores: np.ndarray, ids: np.ndarray, top_k: int) -> list[Candidate]:
        """The first ``top_k`` distinct individuals of one ranked row, each at its best image."""
        best: dict[uuid.UUID, Candidate] = {}
        for score, emb_id in zip(scores, ids, strict=True):
            if emb_id < 0:
                continue
            candidate = self._candidate(int(emb_id), float(score))
            # Results come best first, so the first vector seen is the individual's best.
            best.setdefault(candidate.individual_id, candidate)
            if len(best) == top_k:
                break
        return list(best.values())

    def _candidate(self, embedding_id: int, score: float) -> Candidate:
        entry = self._entries[embedding_id]
        return Candidate(
            individual_id=entry.individual_id,
            image_id=entry.image_id,
            embedding_id=embedding_id,
            similarity=score,
        )
