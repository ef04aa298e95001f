"""Search at 100k and 1M vectors: exact scan against the approximate indexes FAISS offers.

The gallery is synthetic and shaped like a trained model's embeddings: individuals with
`--per-individual` photos each, unit vectors scattered around one centre per individual with a
same-individual cosine of about 0.7 (`--spread 0.65`); the queries are new photos of enrolled
individuals. `--spread 0` is not allowed; a large spread (e.g. 100) gives nearly uniform random
vectors, the worst case for any cell-based index. The centres are random in all 512 dimensions,
which makes this a hard case for graph and cell indexes (trained embeddings use fewer dimensions).

Recall@k is the fraction of the exact top-k vectors that the index's top-k contains. With 10 photos
per individual the exact top-10 of a query is its individual's 10 photos, far above the 11th (the
script prints the smallest gap), so recall@10 is "how many of the individual's photos were found",
free of near-ties; "individual@1" is how often the best individual (the service's answer) is the
exact one.

Latency is per single query at k=10 on `--threads` threads (one by default, as one request sees it
on a busy box): the wall-clock p50, and the p50 of the process's CPU time, which is what the search
costs and which other work on the machine does not inflate. Speed-ups are exact / index, each.
Bytes per vector count what the index holds (vectors, ids, graph links, centroids); the service
keeps its exact index beside an approximate one. Build time is wall-clock (CPU seconds in brackets).

Index kinds (`--kinds`): `pq` is the service's default, 4-bit product-quantisation codes scanned
with FAISS's fast scan and the best refine x k candidates rescored with the exact vectors
(service/ml/ann.py `FastScanIndex`, through the service's own `VectorIndex`), one index per
`--pq-dims-per-code`, `--refine` swept; its bytes per vector are the codes and ids beside the
exact master copy it rescores from; `ivf` is the service's IVF-Flat with nlist =
cells_per_sqrt x sqrt(N) for each `--cells-per-sqrt`, `--nprobe` swept; `hnsw` is FAISS's
IndexHNSWFlat (inner product, `--hnsw-m`, `--hnsw-ef-construction`), `--hnsw-ef-search` swept.

The exact-search threshold: the largest of `--threshold-sizes` whose exact single-query p50 meets
`--target-ms` (the latency target of one search).

    PYTHONPATH=. python bench/large_gallery.py                       # 100k and 1M, PQ, IVF and HNSW
    PYTHONPATH=. python bench/large_gallery.py --sizes 100000 --kinds ivf --nprobe 32 --threshold-sizes
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from typing import Any, Protocol

import faiss
import numpy as np

from service.ml.ann import FastScanIndex, IndexPlan, IvfIndex
from service.ml.index import VectorIndex, as_unit_vectors, use_blas_for_batches

DIM = 512
K = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", choices=["pq", "ivf", "hnsw"], default=["pq", "ivf", "hnsw"])
    parser.add_argument("--pq-dims-per-code", type=int, nargs="+", default=[4])
    parser.add_argument("--refine", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--cells-per-sqrt", type=float, nargs="+", default=[4.0])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--hnsw-ef-search", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--per-individual", type=int, default=10)
    parser.add_argument("--spread", type=float, default=0.65)
    parser.add_argument("--queries", type=int, default=200, help="queries for recall and latency")
    parser.add_argument("--exact-queries", type=int, default=30, help="exact single queries timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target-ms", type=float, default=10.0)
    parser.add_argument("--threshold-sizes", type=int, nargs="*", default=[10_000, 25_000, 50_000, 100_000])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def photos(rng: np.random.Generator, centres: np.ndarray, owners: np.ndarray, spread: float) -> np.ndarray:
    """Unit vectors around ``centres[owners]``, built in chunks to bound memory."""
    out = np.empty((len(owners), DIM), dtype=np.float32)
    for start in range(0, len(owners), 100_000):
        part = owners[start : start + 100_000]
        noise = rng.standard_normal((len(part), DIM), dtype=np.float32) * np.float32(spread / np.sqrt(DIM))
        block = centres[part] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(part)] = block
    return out


def gallery(size: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, individual of each vector, queries: new photos of random enrolled individuals)."""
    rng = np.random.default_rng(args.seed + size)
    individuals = max(1, size // args.per_individual)
    centres = as_unit_vectors(rng.standard_normal((individuals, DIM), dtype=np.float32), DIM)
    owners = np.arange(size) % individuals
    vectors = photos(rng, centres, owners, args.spread)
    asked = rng.integers(0, individuals, size=args.queries)
    return vectors, owners, photos(rng, centres, asked, args.spread)


class Searchable(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Latency:
    """Single-query search times in milliseconds: wall clock and process CPU."""

    wall: list[float]
    cpu: list[float]

    @property
    def wall_p50(self) -> float:
        return float(np.percentile(self.wall, 50))

    @property
    def cpu_p50(self) -> float:
        return float(np.percentile(self.cpu, 50))


def timed(index: Searchable, queries: np.ndarray, repeats: int) -> Latency:
    """Times ``repeats`` single-query searches at k=10, cycling through ``queries``."""
    wall, cpu = [], []
    for i in range(repeats):
        query = np.ascontiguousarray(queries[i % len(queries)][None])
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        index.search(query, K)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
        wall.append((time.perf_counter() - start_wall) * 1000.0)
    return Latency(wall, cpu)


@dataclass(frozen=True)
class Built:
    """An index under test: its searcher, bytes per vector and build time."""

    index: Searchable
    bytes_per_vector: float
    build_wall_s: float
    build_cpu_s: float


def build(make: Callable[[], tuple[Searchable, float]]) -> Built:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    index, bytes_per_vector = make()
    return Built(index, bytes_per_vector, time.perf_counter() - start_wall, time.process_time() - start_cpu)


@dataclass(frozen=True)
class Row:
    gallery: int
    index: str
    recall1: float
    recall10: float
    individual1: float
    latency: Latency
    exact: Latency
    bytes_per_vector: float
    build: str

    def cells(self) -> list[str]:
        return [
            f"{self.gallery:,d}",
            self.index,
            f"{self.recall1:.3f}",
            f"{self.recall10:.3f}",
            f"{self.individual1:.3f}",
            f"{self.latency.wall_p50:.2f} ms",
            f"{self.exact.wall_p50 / self.latency.wall_p50:.0f}x",
            f"{self.latency.cpu_p50:.2f} ms",
            f"{self.exact.cpu_p50 / self.latency.cpu_p50:.0f}x",
            f"{self.bytes_per_vector:,.0f}",
            self.build,
        ]


HEADER = [
    "gallery", "index", "recall@1", "recall@10", "individual@1", "1-query p50", "vs exact",
    "CPU p50", "vs exact (CPU)", "B/vector", "build",
]  # fmt: skip


class Oracle:
    """One gallery's queries, their exact answers and exact latency; it scores any index against them."""

    def __init__(self, flat: faiss.IndexFlatIP, owners: np.ndarray, queries: np.ndarray,
                 args: argparse.Namespace) -> None:  # fmt: skip
        scores, ids = flat.search(queries, K + 1)  # batched: the recall oracle
        self.size = int(flat.ntotal)
        self.queries = queries
        self.repeats = args.queries
        self.ids = ids[:, :K]
        self.owners = owners
        self.gap = float(np.min(scores[:, K - 1] - scores[:, K]))
        self.own_individual = float(np.mean(owners[self.ids] == owners[self.ids[:, :1]]))
        self.exact = timed(flat, queries, args.exact_queries)

    def exact_row(self) -> Row:
        return Row(self.size, "exact (IndexFlatIP)", 1.0, 1.0, 1.0, self.exact, self.exact, 4 * DIM + 8, "-")

    def row(self, name: str, built: Built) -> Row:
        _, found = built.index.search(self.queries, K)
        recall10 = np.mean([len(set(f) & set(e)) / K for f, e in zip(found, self.ids, strict=True)])
        return Row(
            gallery=self.size,
            index=name,
            recall1=float(np.mean(found[:, 0] == self.ids[:, 0])),
            recall10=float(recall10),
            individual1=float(np.mean(self.owners[found[:, 0]] == self.owners[self.ids[:, 0]])),
            latency=timed(built.index, self.queries, self.repeats),
            exact=self.exact,
            bytes_per_vector=built.bytes_per_vector,
            build=f"{built.build_wall_s:.0f} s ({built.build_cpu_s:.0f} CPU s)",
        )


def ivf_rows(vectors: np.ndarray, oracle: Oracle, args: argparse.Namespace) -> Iterator[Row]:
    size = len(vectors)
    ids = np.arange(size, dtype=np.int64)
    for cells_per_sqrt in args.cells_per_sqrt:

        def make(scale: float = cells_per_sqrt) -> tuple[Searchable, float]:
            ivf = IvfIndex(DIM, vectors, ids, IndexPlan(exact_max_vectors=1, cells_per_sqrt=scale))
            return ivf, (size * (4 * DIM + 8) + ivf.nlist * 4 * DIM) / size

        built = build(make)
        ivf = built.index
        assert isinstance(ivf, IvfIndex)
        for nprobe in args.nprobe:
            if nprobe > ivf.nlist:
                continue
            ivf.nprobe = nprobe
            yield oracle.row(f"IVF nlist {ivf.nlist}, nprobe {nprobe}", built)
        del built, ivf


def pq_rows(vectors: np.ndarray, oracle: Oracle, args: argparse.Namespace) -> Iterator[Row]:
    """The service's own index (exact master plus the fast-scan codes) as a species holds it."""
    size = len(vectors)
    for dims_per_code in args.pq_dims_per_code:

        def make(per_code: int = dims_per_code) -> tuple[Searchable, float]:
            plan = IndexPlan(exact_max_vectors=1, kind="pq", pq_dims_per_code=per_code)
            index = VectorIndex(DIM, use_gpu=False, plan=plan)
            index.add(np.arange(size, dtype=np.int64), vectors)
            assert isinstance(index._ann, FastScanIndex)
            return index, index._ann.bytes_per_vector

        built = build(make)
        index = built.index
        assert isinstance(index, VectorIndex) and isinstance(index._ann, FastScanIndex)
        fast_scan = index._ann
        for refine in args.refine:
            fast_scan.refine = refine
            name = f"PQ {fast_scan.codes}x4 fast scan, {refine} x k rescored"
            yield oracle.row(name, built)
        del built, index, fast_scan


def hnsw_rows(vectors: np.ndarray, oracle: Oracle, args: argparse.Namespace) -> Iterator[Row]:
    def make() -> tuple[Searchable, float]:
        hnsw = faiss.IndexHNSWFlat(DIM, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = args.hnsw_ef_construction
        hnsw.add(vectors)
        graph: Any = hnsw.hnsw  # the stubs lack the graph's arrays
        links = sum(faiss.vector_to_array(v).nbytes for v in (graph.neighbors, graph.offsets, graph.levels))
        return hnsw, 4 * DIM + links / len(vectors)

    built = build(make)
    hnsw = built.index
    assert isinstance(hnsw, faiss.IndexHNSWFlat)
    config = f"HNSW M {args.hnsw_m}, efConstruction {args.hnsw_ef_construction}"
    for ef in args.hnsw_ef_search:
        hnsw.hnsw.efSearch = ef
        yield oracle.row(f"{config}, efSearch {ef}", built)


def exact_threshold(args: argparse.Namespace) -> None:
    if not args.threshold_sizes:
        return
    print(f"\nexact single-query search, p50 on {args.threads} thread(s), target {args.target_ms} ms:")
    meeting = 0
    for size in args.threshold_sizes:
        vectors, _, queries = gallery(size, args)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(vectors)
        latency = timed(flat, queries, args.exact_queries)
        ok = latency.wall_p50 <= args.target_ms
        meeting = size if ok else meeting
        verdict = "meets" if ok else "misses"
        cpu = f"(CPU {latency.cpu_p50:7.2f} ms)"
        print(f"  {size:>9,d} vectors: p50 {latency.wall_p50:7.2f} ms {cpu}  {verdict}")
    print(f"  largest size meeting the target: {meeting:,d} (the default exact_search_max_vectors)")


def compare(size: int, args: argparse.Namespace) -> Iterator[Row]:
    print(f"\n{size:,d} vectors x {DIM} (individuals of {args.per_individual} photos, spread {args.spread}):")
    start = time.perf_counter()
    vectors, owners, queries = gallery(size, args)
    print(f"  generated in {time.perf_counter() - start:.1f} s", flush=True)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors)
    oracle = Oracle(flat, owners, queries, args)
    del flat
    print(
        f"  exact top-{K} is the asked individual's photos for {oracle.own_individual:.1%} of queries; "
        f"smallest score gap between rank {K} and {K + 1}: {oracle.gap:.3f}"
    )
    kinds = {"pq": pq_rows, "ivf": ivf_rows, "hnsw": hnsw_rows}
    rows = chain([oracle.exact_row()], *(kinds[kind](vectors, oracle, args) for kind in args.kinds))
    for row in rows:
        print("  " + " | ".join(row.cells()), flush=True)
        yield row
    print(f"  peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    faiss.omp_set_num_threads(args.threads)
    use_blas_for_batches(DIM)
    print(
        f"large_gallery.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
        f"{faiss.omp_get_max_threads()} FAISS thread(s), faiss {faiss.__version__}"
    )
    exact_threshold(args)
    rows = [row for size in args.sizes for row in compare(size, args)]
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()
