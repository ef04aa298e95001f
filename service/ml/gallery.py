"""A species' searchable gallery: the vector index plus which image and individual each vector is.

Searches return individuals, never the same one twice: each candidate carries its best score
(the maximum over its images) and the image that produced it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

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
        self._lock = threading.RLock()

    @property
    def on_gpu(self) -> bool:
        return self._index.on_gpu

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
            self._entries.update(zip((int(i) for i in ids), entry_list, strict=True))

    def remove(self, embedding_ids: Iterable[int]) -> int:
        ids = np.fromiter((int(i) for i in embedding_ids), dtype=np.int64)
        with self._lock:
            removed = self._index.remove(ids)
            for i in ids:
                self._entries.pop(int(i), None)
            return removed

    def reassign(self, embedding_ids: Iterable[int], individual_id: uuid.UUID) -> None:
        """Point vectors at another individual (after a merge); the vectors themselves are unchanged."""
        with self._lock:
            for i in embedding_ids:
                entry = self._entries[int(i)]
                self._entries[int(i)] = GalleryEntry(image_id=entry.image_id, individual_id=individual_id)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) in storage order, for consistency checks and tests."""
        with self._lock:
            return self._index.ids().copy(), self._index.vectors()

    def search_individuals(self, query: np.ndarray, top_k: int) -> list[Candidate]:
        """The ``top_k`` most similar individuals, best first, each with its best-matching image."""
        if top_k <= 0:
            raise ValueError("top_k must be positive")
        with self._lock:
            total = self._index.ntotal
            k = min(total, top_k * OVERFETCH)
            while k > 0:
                scores, ids = self._index.search(query, k)
                best: dict[uuid.UUID, Candidate] = {}
                for score, emb_id in zip(scores[0], ids[0], strict=True):
                    if emb_id < 0:
                        continue
                    candidate = self._candidate(int(emb_id), float(score))
                    # Results come best first, so the first vector seen is the individual's best.
                    best.setdefault(candidate.individual_id, candidate)
                    if len(best) == top_k:
                        return list(best.values())
                if k >= total:
                    return list(best.values())
                k = min(total, k * OVERFETCH)
            return []

    def _candidate(self, embedding_id: int, score: float) -> Candidate:
        entry = self._entries[embedding_id]
        return Candidate(
            individual_id=entry.individual_id,
            image_id=entry.image_id,
            embedding_id=embedding_id,
            similarity=score,
        )
