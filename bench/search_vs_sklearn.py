"""Exact search: the service's FAISS index against scikit-learn's brute-force cosine NearestNeighbors.

Both answer the same question (the k most cosine-similar of N gallery vectors). For each gallery
size and thread count the table gives the median time per call for one query (what one identify
does) and for a batch of queries, the speed-up, and whether both return the same neighbours.
FAISS and the BLAS under scikit-learn get the same number of threads.

    .venv/bin/python bench/search_vs_sklearn.py                   # 10k, 100k and 1M vectors
    .venv/bin/python bench/search_vs_sklearn.py --sizes 10000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import faiss
import numpy as np
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from service.ml.index import VectorIndex, gpu_count


def unit_vectors(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def agreement(f_ids: np.ndarray, s_ids: np.ndarray, f_scores: np.ndarray, s_dist: np.ndarray) -> str:
    same = int((f_ids == s_ids).all(axis=1).sum())
    diff = float(np.abs(f_scores - (1.0 - s_dist)).max())
    return f"{same}/{len(f_ids)} queries identical top-k, max |sim diff| {diff:.1e}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes, comma-separated")
    parser.add_argument("--threads", default="1,2", help="thread counts to measure, comma-separated")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="queries in the batched measurement")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell (median reported)")
    parser.add_argument("--big-repeats", type=int, default=3, help="timed sklearn calls from 1M vectors on")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, FAISS {faiss.__version__} "
        f"on {'GPU' if gpu_count() else 'CPU'}, load average at start {os.getloadavg()[0]:.2f}"
    )
    print(f"d={args.dim}, k={args.k}, float32, inner product of unit vectors (= cosine similarity)")
    print("times are medians in ms per call; x = sklearn time / FAISS time\n")
    b = args.batch
    columns = ["N", "threads", "FAISS 1q", "sklearn 1q", "x"]
    columns += [f"FAISS {b}q", f"sklearn {b}q", "x", "same results"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    queries = unit_vectors(rng, b, args.dim)
    for n in (int(s) for s in args.sizes.split(",")):
        gallery = unit_vectors(rng, n, args.dim)
        index = VectorIndex(args.dim)
        index.add(np.arange(n, dtype=np.int64), gallery)
        nn = NearestNeighbors(n_neighbors=args.k, metric="cosine", algorithm="brute").fit(gallery)
        for threads in (int(t) for t in args.threads.split(",")):
            faiss.omp_set_num_threads(threads)
            with threadpool_limits(limits=threads):
                sk_repeats = args.big_repeats if n >= 1_000_000 else args.repeats
                f1 = median_ms(lambda index=index: index.search(queries[:1], args.k), args.repeats)
                s1 = median_ms(lambda nn=nn: nn.kneighbors(queries[:1]), sk_repeats)
                fb = median_ms(lambda index=index: index.search(queries, args.k), args.repeats)
                sb = median_ms(lambda nn=nn: nn.kneighbors(queries), sk_repeats)
                f_scores, f_ids = index.search(queries, args.k)
                s_dist, s_ids = nn.kneighbors(queries)
            cells = [f"{n:,}", str(threads), f"{f1:.2f}", f"{s1:.2f}", f"{s1 / f1:.1f}"]
            cells += [f"{fb:.2f}", f"{sb:.2f}", f"{sb / fb:.1f}", agreement(f_ids, s_ids, f_scores, s_dist)]
            print("| " + " | ".join(cells) + " |", flush=True)
        del gallery, index, nn


if __name__ == "__main__":
    main()
