"""Search at 100k and 1M vectors: exact scan against the IVF index the service switches to.

The gallery is synthetic and shaped like a trained model's embeddings: individuals with
`--per-individual` photos each, unit vectors scattered around one centre per individual with a
same-individual cosine of about 0.7 (`--spread 0.65`); the queries are new photos of enrolled
individuals. `--spread 0` is not allowed; a large spread (e.g. 100) gives nearly uniform random
vectors, the worst case for any cell-based index. Latency is per single query on `--threads`
threads (one by default, as one request sees it on a busy box), and for a batch of 8 queries.

Recall@k is the fraction of the exact top-k vectors that the IVF top-k contains; "individual@1"
is how often the best individual (the service's answer) is the exact one.

The exact-search threshold: the largest of `--threshold-sizes` whose exact single-query p50 meets
`--target-ms` (the latency target of one search).

    PYTHONPATH=. python bench/large_gallery.py                       # 100k and 1M, nprobe 8/16/32/64
    PYTHONPATH=. python bench/large_gallery.py --sizes 100000 --nprobe 32
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from datetime import UTC, datetime
from typing import Protocol

import faiss
import numpy as np

from service.ml.ann import IndexPlan, IvfIndex
from service.ml.index import as_unit_vectors, use_blas_for_batches

DIM = 512


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--per-individual", type=int, default=10)
    parser.add_argument("--spread", type=float, default=0.65)
    parser.add_argument("--queries", type=int, default=200, help="IVF queries per setting")
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


def timed(index: Searchable, queries: np.ndarray, repeats: int, batch: int = 1) -> list[float]:
    """Milliseconds per search of ``batch`` queries at k=10, cycling through ``queries``."""
    times = []
    for i in range(repeats):
        start_row = (i * batch) % max(1, len(queries) - batch + 1)
        chunk = np.ascontiguousarray(queries[start_row : start_row + batch])
        start = time.perf_counter()
        index.search(chunk, 10)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def exact_threshold(args: argparse.Namespace) -> None:
    print(f"\nexact single-query search, p50 on {args.threads} thread(s), target {args.target_ms} ms:")
    meeting = 0
    for size in args.threshold_sizes:
        vectors, _, queries = gallery(size, args)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(vectors)
        latency = timed(flat, queries, args.exact_queries)
        ok = p(latency, 50) <= args.target_ms
        meeting = size if ok else meeting
        verdict = "meets" if ok else "misses"
        print(f"  {size:>9,d} vectors: p50 {p(latency, 50):7.2f} ms  p95 {p(latency, 95):7.2f} ms  {verdict}")
    print(f"  largest size meeting the target: {meeting:,d} (the default exact_search_max_vectors)")


def compare(size: int, args: argparse.Namespace) -> None:
    print(f"\n{size:,d} vectors x {DIM} (individuals of {args.per_individual} photos, spread {args.spread}):")
    start = time.perf_counter()
    vectors, owners, queries = gallery(size, args)
    ids = np.arange(size, dtype=np.int64)
    print(f"  generated in {time.perf_counter() - start:.1f} s")
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors)
    exact_scores, exact_ids = flat.search(queries, 10)  # batched: the recall oracle
    single = timed(flat, queries, args.exact_queries)
    batch = timed(flat, queries, 10, batch=8)
    print(
        f"  exact (IndexFlatIP): 1 query p50 {p(single, 50):.1f} ms p99 {p(single, 99):.1f} ms; "
        f"8 queries p50 {p(batch, 50):.1f} ms; {4 * DIM} B/vector (+8 B id in the service's id map)"
    )
    start = time.perf_counter()
    ivf = IvfIndex(DIM, vectors, ids, IndexPlan(exact_max_vectors=1))
    built = time.perf_counter() - start
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        found_scores, found = ivf.search(queries, 10)
        recall1 = float(np.mean(found[:, 0] == exact_ids[:, 0]))
        recall10 = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact_ids, strict=True)]))
        individual1 = float(np.mean(owners[found[:, 0]] == owners[exact_ids[:, 0]]))
        single_ivf = timed(ivf, queries, args.queries)
        batch_ivf = timed(ivf, queries, 20, batch=8)
        memory = (size * (4 * DIM + 8) + ivf.nlist * 4 * DIM) / size
        print(
            f"  IVF nlist {ivf.nlist} nprobe {nprobe:>3}: recall@1 {recall1:.3f} recall@10 {recall10:.3f} "
            f"individual@1 {individual1:.3f} | 1 query p50 {p(single_ivf, 50):.2f} ms "
            f"p99 {p(single_ivf, 99):.2f} ms ({p(single, 50) / p(single_ivf, 50):.0f}x faster than exact); "
            f"8 queries p50 {p(batch_ivf, 50):.2f} ms | {memory:.0f} B/vector | built in {built:.1f} s"
        )
    print(f"  peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main() -> None:
    args = parse_args()
    faiss.omp_set_num_threads(args.threads)
    use_blas_for_batches(DIM)
    print(
        f"large_gallery.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
        f"{faiss.omp_get_max_threads()} FAISS thread(s), faiss {faiss.__version__}"
    )
    exact_threshold(args)
    for size in args.sizes:
        compare(size, args)


if __name__ == "__main__":
    main()
