"""Approximate search for large galleries, built by FAISS: product-quantised codes scanned with
FAISS's fast scan and rescored exactly (the default), or an inverted-file (IVF) index.

Exact search costs one pass over every vector per query: about 18 ms per query at 100,000 vectors
of 512 dimensions on one core of the 2-core CPU, so about 180 ms at a million. Above
``IndexPlan.exact_max_vectors`` a species' index also keeps one of:

- ``pq`` (:class:`FastScanIndex`): every vector as a 4-bit product-quantisation code (an eighth of
  a byte per dimension), all of them scanned per query with FAISS's SIMD fast scan, which is an
  order of magnitude cheaper than the float scan; the best ``refine x k`` candidates are then
  rescored with the exact vectors of the master copy, so the scores returned are exact and the
  quantisation only decides which candidates are looked at. It has no cells, so it does not depend
  on the gallery clustering well: measured at 1M vectors, recall@10 above the IVF's at a fraction of
  its CPU time (docs/benchmarks.md).
- ``ivf`` (:class:`IvfIndex`): an ``IndexIVFFlat``, k-means cells of the vectors, of which a query
  scans the ``nprobe`` nearest, so a search reads a fraction ``nprobe / nlist`` of the gallery.

Both support removal, so deletes and merges stay immediate (FAISS's HNSW graph does not, and
measured slower at equal recall). The exact index remains the master copy (ids, reconstruction,
removal, and searches for more neighbours than the approximate index gives reliably);
``bench/large_gallery.py`` measures recall and latency against it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import faiss
import numpy as np

log = logging.getLogger(__name__)

# FAISS wants at least this many training points per cell; fewer gives poorly placed centroids.
TRAIN_POINTS_PER_CELL = 39
# Largest k answered from the approximate index; beyond it the exact master ranks the whole gallery.
MAX_APPROXIMATE_K = 1024
# Product quantisation for the fast scan: 4-bit codes, one per this many dimensions, trained on at
# most this many vectors (the sub-quantisers have 16 centroids each, so a sample suffices).
PQ_BITS = 4
PQ_TRAIN_SAMPLE = 65_536
# Fewer vectors than this cannot place 16 centroids per sub-quantiser well (FAISS refuses fewer
# than 16); such a gallery is searched exactly, which at this size costs microseconds anyway.
PQ_MIN_VECTORS = (1 << PQ_BITS) * TRAIN_POINTS_PER_CELL
# Candidates rescored per query at the least, whatever k: a single best match (k=1) is the answer
# the service gives most, and rescoring 100 vectors costs microseconds next to the scan.
PQ_MIN_CANDIDATES = 100

ApproximateKind = Literal["pq", "ivf"]


@dataclass(frozen=True)
class IndexPlan:
    """When a species' index turns approximate, and how it is built.

    ``exact_max_vectors``: galleries up to this size are searched exactly (0: always exact).
    ``kind``: the approximate index above that size, ``pq`` (fast-scan codes rescored exactly) or
    ``ivf``. ``pq_dims_per_code``: dimensions per 4-bit code (4: 512 dimensions in 64 bytes;
    fewer is finer and slower); ``refine``: candidates rescored exactly per neighbour asked
    (``refine x k``, at least ``PQ_MIN_CANDIDATES``).
    ``nprobe`` (IVF): cells scanned per query. ``cells_per_sqrt``: nlist = cells_per_sqrt * sqrt(N); finer
    cells put fewer individuals in each, so one cell holds more of one individual's photos. Measured
    (bench/large_gallery.py) 4 sqrt(N) cells with nprobe 64 against sqrt(N) with nprobe 32: recall@10
    0.911 against 0.777 at 1M vectors and 1.000 against 0.940 at 100k, in less CPU time per query,
    at the cost of a longer k-means (185 against 24 CPU seconds at 1M).
    ``rebuild_growth``: the IVF is rebuilt (new k-means) when the gallery has grown this many
    times since it was built, so the cells stay about the same size.
    """

    exact_max_vectors: int = 0
    kind: ApproximateKind = "pq"
    pq_dims_per_code: int = 4
    refine: int = 50
    nprobe: int = 64
    cells_per_sqrt: float = 4.0
    rebuild_growth: float = 4.0
    seed: int = 1234

    @property
    def enabled(self) -> bool:
        return self.exact_max_vectors > 0

    def wants_approximate(self, size: int) -> bool:
        """Above the exact size, and for ``pq`` with enough vectors to train its sub-quantisers."""
        if self.kind == "pq" and size < PQ_MIN_VECTORS:
            return False
        return self.enabled and size > self.exact_max_vectors

    def nlist(self, size: int) -> int:
        return max(1, int(self.cells_per_sqrt * math.sqrt(size)))

    def build(
        self, dim: int, vectors: np.ndarray, ids: np.ndarray, exact: Callable[[np.ndarray], np.ndarray]
    ) -> ApproximateIndex:
        """The plan's approximate index over ``vectors`` (unit rows) with database ``ids``; ``exact``
        gives the master copy's vectors of given ids (for the ``pq`` rescoring)."""
        if self.kind == "ivf":
            return IvfIndex(dim, vectors, ids, self)
        return FastScanIndex(dim, vectors, ids, self, exact)


class ApproximateIndex(Protocol):
    """What :class:`service.ml.index.VectorIndex` needs of an approximate index."""

    built_size: int

    def add(self, ids: np.ndarray, unit: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(self, unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first; rows end in id -1 when fewer than k were found."""
        ...


def training_sample(vectors: np.ndarray, sample: int, seed: int) -> np.ndarray:
    """``sample`` rows of ``vectors`` in storage order (all of them if there are fewer)."""
    size = len(vectors)
    if sample >= size:
        return np.ascontiguousarray(vectors)
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(vectors[np.sort(rng.choice(size, size=sample, replace=False))])


def pq_codes(dim: int, dims_per_code: int) -> int:
    """Sub-quantisers for ``dim`` dimensions at about ``dims_per_code`` each: the nearest count that
    divides ``dim`` (FAISS needs equal sub-vectors), preferring more codes (finer)."""
    wanted = max(1, dim // max(1, dims_per_code))
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - wanted), -m))


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove the database ``ids`` (C-contiguous int64) from ``index``; how many it held."""
    return int(index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids))))


class _DatabaseIdIndex:
    """A FAISS index (``_index``) keyed by database ids: what adds, removals and its size take."""

    _index: faiss.Index
    built_size: int

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, unit: np.ndarray) -> None:
        self._index.add_with_ids(unit, ids)

    def remove(self, ids: np.ndarray) -> None:
        remove_ids(self._index, ids)


class FastScanIndex(_DatabaseIdIndex):
    """4-bit product-quantisation codes scanned with FAISS's fast scan; the best ``refine x k``
    candidates are rescored with the exact vectors, so returned scores are exact."""

    def __init__(
        self,
        dim: int,
        vectors: np.ndarray,
        ids: np.ndarray,
        plan: IndexPlan,
        exact: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        self.codes = pq_codes(dim, plan.pq_dims_per_code)
        self.refine = max(1, plan.refine)
        self.built_size = len(ids)
        index = faiss.IndexPQFastScan(dim, self.codes, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = plan.seed
        index.train(training_sample(vectors, PQ_TRAIN_SAMPLE, plan.seed))
        self._index = faiss.IndexIDMap(index)
        self._codes_index = index  # the ID map does not own it
        self._index.add_with_ids(vectors, ids)
        self._exact = exact
        log.info(
            "built a fast-scan index: %d vectors as %d 4-bit codes, %dx candidates rescored",
            len(ids), self.codes, self.refine,
        )  # fmt: skip

    @property
    def bytes_per_vector(self) -> float:
        return self.codes * PQ_BITS / 8 + 8  # the codes and the id

    def search(self, unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first, scores exact; rows end in id -1 when fewer than k were found."""
        wanted = min(self.ntotal, max(self.refine * k, PQ_MIN_CANDIDATES))
        _, candidates = self._index.search(unit, wanted)
        return rescore(unit, candidates, self._exact, k)


def rescore(
    unit: np.ndarray, candidates: np.ndarray, exact: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each row's ``candidates`` (ids, -1 for none) by exact inner product with
    the vectors ``exact`` gives; (scores, ids) padded with (-inf, -1)."""
    found = candidates >= 0
    known = np.unique(candidates[found])
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    if known.size:
        vectors = exact(known)
        rows = np.searchsorted(known, np.where(found, candidates, known[0]))
        # Row by row: each query against its own candidates only, not every query's (a batch of 64
        # queries with 1,000 candidates each would otherwise be a 64 x 64,000 product).
        for query, (mine, present) in enumerate(zip(rows, found, strict=True)):
            scores[query, present] = vectors[mine[present]] @ unit[query]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    ids = np.where(np.isfinite(best), np.take_along_axis(candidates, order, axis=1), -1)
    return best, ids


class IvfIndex(_DatabaseIdIndex):
    """Inner-product IVF over unit vectors, with database ids as FAISS ids."""

    _index: faiss.IndexIVFFlat

    def __init__(self, dim: int, vectors: np.ndarray, ids: np.ndarray, plan: IndexPlan) -> None:
        size = len(ids)
        self.nlist = min(plan.nlist(size), max(1, size // TRAIN_POINTS_PER_CELL))
        self.built_size = size
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = plan.seed
        index.cp.niter = 10
        index.train(training_sample(vectors, self.nlist * 64, plan.seed))
        index.add_with_ids(vectors, ids)
        index.nprobe = min(plan.nprobe, self.nlist)
        self._quantizer = quantizer  # the IVF index does not own it
        self._index = index
        log.info("built an IVF index: %d vectors in %d cells, nprobe %d", size, self.nlist, index.nprobe)

    @property
    def nprobe(self) -> int:
        return int(self._index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._index.nprobe = min(max(1, value), self.nlist)

    def search(self, unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first; rows end in id -1 when the scanned cells hold fewer than k."""
        scores, ids = self._index.search(unit, k)
        return scores, ids
