"""Inner-product search over L2-normalised float32 vectors, with database ids as FAISS ids: exact,
or through an approximate index above a configured size (:mod:`service.ml.ann`).

The CPU index (``IndexIDMap2`` over ``IndexFlatIP``) is the master copy: it supports removal and
reconstruction. When FAISS sees a GPU, a ``GpuIndexFlatIP`` mirror answers searches; it is
rebuilt from the master after removals (rare) and appended to on adds.

Not thread-safe on its own: :class:`service.ml.gallery.Gallery` serialises access.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from service.ml.ann import MAX_APPROXIMATE_K, ApproximateIndex, IndexPlan, remove_ids

log = logging.getLogger(__name__)

# GPU k-selection handles at most this many neighbours per query; larger k searches the CPU master.
GPU_MAX_K = 2048


def use_blas_for_batches(dim: int) -> None:
    """Scan single queries with FAISS's SIMD loop and answer batches with one BLAS product.

    FAISS takes its SIMD loop while queries x dim is below ``distance_compute_blas_threshold``;
    the faiss-gpu wheel sets that to 128,000, so a batch of up to 250 queries of 512 dimensions
    scans the whole gallery once per query. Measured on the 2-core CPU (100k x 512): 8 queries
    took 163 ms that way and 47 ms as one product, while one query takes 19 ms in the loop
    against 44 ms through BLAS; two queries cost the same either way. The setting is process-wide
    and the same for every index of one dimension, so setting it again is harmless.
    """
    faiss.cvar.distance_compute_blas_threshold = 2 * dim


def gpu_count() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # a CPU-only FAISS build
        return 0


def as_unit_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    """A C-contiguous float32 (n, dim) copy with unit rows. Zero or non-finite rows are refused."""
    array = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {np.shape(vectors)}")
    if not np.isfinite(array).all():
        raise ValueError("vectors must be finite")
    norms = np.linalg.norm(array, axis=1)
    if array.shape[0] and float(norms.min()) < 1e-12:
        raise ValueError("zero vectors cannot be normalised")
    array /= norms[:, None]
    return array


class VectorIndex:
    def __init__(
        self, dim: int, use_gpu: bool | None = None, gpu_device: int = 0, plan: IndexPlan | None = None
    ) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        # Above the plan's size a CPU index also answers searches from an approximate index
        # (service/ml/ann.py).
        self._plan = plan if plan is not None else IndexPlan()
        self._ann: ApproximateIndex | None = None
        self._cpu = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        use_blas_for_batches(dim)
        self._ids: set[int] = set()
        want_gpu = gpu_count() > 0 if use_gpu is None else use_gpu
        if want_gpu and gpu_count() == 0:
            raise RuntimeError("a GPU index was requested but FAISS sees no GPU")
        self._gpu_device = gpu_device
        self._gpu_resources = faiss.StandardGpuResources() if want_gpu else None
        self._gpu: faiss.Index | None = None
        self._gpu_ids = np.empty(0, dtype=np.int64)
        if want_gpu:
            self._rebuild_gpu()

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def approximate(self) -> bool:
        """True while searches go to the approximate index rather than the exact scan."""
        return self._ann is not None

    def set_plan(self, plan: IndexPlan) -> None:
        """Adopt ``plan`` now: build the approximate index if the gallery is above its size (a
        training pass over the vectors, which takes seconds at a million), or drop it if below."""
        self._plan = plan
        self._replan()

    def _replan(self) -> None:
        """Build, rebuild (after much growth) or drop the approximate index to follow the plan. Only
        a CPU index turns approximate: on a GPU the exact scan of a million vectors takes about a
        millisecond."""
        wanted = self._gpu is None and self._plan.wants_approximate(self.ntotal)
        if not wanted:
            self._ann = None
        elif self._ann is None or self.ntotal >= self._ann.built_size * self._plan.rebuild_growth:
            self._ann = self._plan.build(self.dim, self.vectors(), self.ids().copy(), self.reconstruct)

    @property
    def ntotal(self) -> int:
        return int(self._cpu.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def __contains__(self, item: int) -> bool:
        return int(item) in self._ids

    def ids(self) -> np.ndarray:
        """Ids in storage order."""
        return faiss.vector_to_array(self._cpu.id_map).astype(np.int64, copy=False)

    def vectors(self) -> np.ndarray:
        """Stored vectors in storage order, aligned with :meth:`ids`."""
        flat = faiss.downcast_index(self._cpu.index)
        if flat.ntotal == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return flat.reconstruct_n(0, flat.ntotal)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (each must be present), in that order."""
        keys = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if not keys.size:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._cpu.reconstruct_batch(keys)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        id_array = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        unit = as_unit_vectors(vectors, self.dim)
        if unit.shape[0] != id_array.shape[0]:
            raise ValueError(f"{id_array.shape[0]} ids for {unit.shape[0]} vectors")
        if len(id_array) == 0:
            return
        new = {int(i) for i in id_array}
        if len(new) != len(id_array):
            raise ValueError("duplicate ids in one add")
        clash = new & self._ids
        if clash:
            raise ValueError(f"ids already in the index: {sorted(clash)[:5]}")
        self._cpu.add_with_ids(unit, id_array)
        if self._gpu is not None:
            try:
                self._gpu.add(unit)
            except BaseException:
                # All or nothing: the master must not keep vectors the mirror's searches miss, and the
                # caller can add the same ids again.
                self._remove_from_cpu(id_array)
                if self._gpu.ntotal != len(self._gpu_ids):
                    self._rebuild_gpu()
                raise
            self._gpu_ids = np.concatenate([self._gpu_ids, id_array])
        self._ids |= new
        if self._ann is not None:
            self._ann.add(id_array, unit)
        self._replan()

    def remove(self, ids: np.ndarray) -> int:
        id_array = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        present = np.array([i for i in id_array if int(i) in self._ids], dtype=np.int64)
        if len(present) == 0:
            return 0
        removed = self._remove_from_cpu(present)
        self._ids -= {int(i) for i in present}
        if self._ann is not None:
            self._ann.remove(present)
            self._replan()
        if self._gpu is not None:
            self._rebuild_gpu()
        return removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores, ids), each (q, min(k, ntotal)), best first."""
        if k <= 0:
            raise ValueError("k must be positive")
        unit = as_unit_vectors(queries, self.dim)
        k = min(k, self.ntotal)
        if k == 0:
            return np.empty((unit.shape[0], 0), np.float32), np.empty((unit.shape[0], 0), np.int64)
        if self._gpu is not None and k <= GPU_MAX_K:
            scores, positions = self._gpu.search(unit, k)
            return scores, self._gpu_ids[positions]
        if self._ann is not None and k <= MAX_APPROXIMATE_K and k < self.ntotal:
            return self._ann.search(unit, k)
        scores, ids = self._cpu.search(unit, k)
        return scores, ids

    def _remove_from_cpu(self, ids: np.ndarray) -> int:
        return remove_ids(self._cpu, ids)

    def _rebuild_gpu(self) -> None:
        assert self._gpu_resources is not None
        gpu = faiss.GpuIndexFlatIP(self._gpu_resources, self.dim, self._gpu_config())
        if self.ntotal:
            gpu.add(self.vectors())
        self._gpu = gpu
        self._gpu_ids = self.ids().copy()

    def _gpu_config(self) -> faiss.GpuIndexFlatConfig:
        config = faiss.GpuIndexFlatConfig()
        config.device = self._gpu_device
        return config
