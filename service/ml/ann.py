"""Approximate search for large galleries: an inverted-file (IVF) index built by FAISS.

Exact search costs one pass over every vector per query: about 18 ms per query at 100,000 vectors
of 512 dimensions on one core of the 2-core CPU, so about 180 ms at a million. Above
``IndexPlan.exact_max_vectors`` a species' index also keeps an ``IndexIVFFlat``: k-means cells of
the vectors, of which a query scans the ``nprobe`` nearest, so a search reads a fraction
``nprobe / nlist`` of the gallery. The vectors are stored uncompressed (no quantisation loss in the
scores), and IVF supports removal, so deletes and merges stay immediate (FAISS's HNSW graph does
not, and measured slower at equal recall: docs/benchmarks.md). The exact index remains
the master copy (ids, reconstruction, removal, and searches for more neighbours than the IVF
gives reliably); ``bench/large_gallery.py`` measures recall and latency against it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

# FAISS wants at least this many training points per cell; fewer gives poorly placed centroids.
TRAIN_POINTS_PER_CELL = 39
# Largest k answered from the IVF; beyond it the exact master ranks the whole gallery.
MAX_APPROXIMATE_K = 1024


@dataclass(frozen=True)
class IndexPlan:
    """When a species' index turns approximate, and how it is built.

    ``exact_max_vectors``: galleries up to this size are searched exactly (0: always exact).
    ``nprobe``: cells scanned per query. ``cells_per_sqrt``: nlist = cells_per_sqrt * sqrt(N); finer
    cells put fewer individuals in each, so one cell holds more of one individual's photos. Measured
    (bench/large_gallery.py) 4 sqrt(N) cells with nprobe 64 against sqrt(N) with nprobe 32: recall@10
    0.911 against 0.777 at 1M vectors and 1.000 against 0.940 at 100k, in less CPU time per query,
    at the cost of a longer k-means (185 against 24 CPU seconds at 1M).
    ``rebuild_growth``: the IVF is rebuilt (new k-means) when the gallery has grown this many
    times since it was built, so the cells stay about the same size.
    """

    exact_max_vectors: int = 0
    nprobe: int = 64
    cells_per_sqrt: float = 4.0
    rebuild_growth: float = 4.0
    seed: int = 1234

    @property
    def enabled(self) -> bool:
        return self.exact_max_vectors > 0

    def wants_approximate(self, size: int) -> bool:
        return self.enabled and size > self.exact_max_vectors

    def nlist(self, size: int) -> int:
        return max(1, int(self.cells_per_sqrt * math.sqrt(size)))


class IvfIndex:
    """Inner-product IVF over unit vectors, with database ids as FAISS ids."""

    def __init__(self, dim: int, vectors: np.ndarray, ids: np.ndarray, plan: IndexPlan) -> None:
        size = len(ids)
        self.nlist = min(plan.nlist(size), max(1, size // TRAIN_POINTS_PER_CELL))
        self.built_size = size
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = plan.seed
        index.cp.niter = 10
        sample = min(size, self.nlist * 64)
        rng = np.random.default_rng(plan.seed)
        training = (
            vectors[np.sort(rng.choice(size, size=sample, replace=False))] if sample < size else vectors
        )
        index.train(np.ascontiguousarray(training))
        index.add_with_ids(vectors, ids)
        index.nprobe = min(plan.nprobe, self.nlist)
        self._quantizer = quantizer  # the IVF index does not own it
        self._index = index
        log.info("built an IVF index: %d vectors in %d cells, nprobe %d", size, self.nlist, index.nprobe)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def nprobe(self) -> int:
        return int(self._index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._index.nprobe = min(max(1, value), self.nlist)

    def add(self, ids: np.ndarray, unit: np.ndarray) -> None:
        self._index.add_with_ids(unit, ids)

    def remove(self, ids: np.ndarray) -> None:
        self._index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))

    def search(self, unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first; rows end in id -1 when the scanned cells hold fewer than k."""
        scores, ids = self._index.search(unit, k)
        return scores, ids
