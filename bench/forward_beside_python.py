"""The forward pass alone and beside threads that run Python: eager against traced.

A server's forward pass shares the process with request threads that run Python (HTTP, decoding,
search, the database). An eager PyTorch pass takes Python's global interpreter lock back after every
layer; while another thread holds it, the pass waits for the interpreter to hand it over (its switch
interval, 5 ms by default). The service therefore serves a traced graph (`Embedder.warmup`, which
runs without the lock). This script times one batch through each, in one process, alone and
beside ``--busy`` threads that loop in pure Python, at the interpreter's default switch interval,
what tracing adds to the process's resident memory, and what each further trace of the model
(a model switch traces the new model) leaves behind for the process's life in TorchScript's own
state (measured after returning freed memory to the system, Linux with glibc).

    PYTHONPATH=. python bench/forward_beside_python.py
    PYTHONPATH=. python bench/forward_beside_python.py --model service/demo/models/dog --batch 8
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.ml.embedder import Embedder  # noqa: E402
from training.artifact import load_artifact  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "tests" / "data" / "dog-resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy Python threads")
    parser.add_argument("--repeats", type=int, default=10, help="passes timed per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as the server's default")
    parser.add_argument("--retraces", type=int, default=5, help="further traces whose memory is kept")
    return parser.parse_args()


def timed(forward: Callable[[torch.Tensor], object], batch: torch.Tensor, busy: int, repeats: int) -> float:
    """Milliseconds per pass while ``busy`` threads loop in Python."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    threads = [threading.Thread(target=spin) for _ in range(busy)]
    for thread in threads:
        thread.start()
    try:
        with torch.inference_mode():
            forward(batch)
            start = time.perf_counter()
            for _ in range(repeats):
                forward(batch)
            return (time.perf_counter() - start) / repeats * 1000.0
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def resident_mb() -> float:
    """Resident memory of this process, after collecting garbage and returning freed heap pages."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    card = json.loads((args.model / "model_card.json").read_text())
    network = card.get("backbone") or card["architecture"]
    height, width = card["input_size"]
    batch = torch.rand(args.batch, 3, height, width).contiguous(memory_format=torch.channels_last)
    eager = Embedder(load_artifact(args.model, "cpu"), torch.device("cpu"))  # not warmed up: eager
    traced = Embedder(load_artifact(args.model, "cpu"), torch.device("cpu"))
    for _ in range(2):  # the eager passes' own buffers, before the memory is read
        traced.embed_tensor(batch)
        traced.embed_tensor(batch[:2])
    before = resident_mb()
    traced.warmup()
    added = resident_mb() - before
    if not traced.traced:
        raise SystemExit(f"{card['model_version']} could not be traced")
    print(
        f"forward_beside_python.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.2f} at start); torch {torch.__version__}, "
        f"{args.threads} thread(s); model {card['model_version']} ({network}, "
        f"{height}x{width}); batch {args.batch}; switch interval {sys.getswitchinterval() * 1000:g} ms\n"
    )
    print("| busy Python threads | eager ms per pass | traced ms per pass | eager / traced |")
    print("|---|---|---|---|")
    for busy in args.busy:
        slow = timed(eager.embed_tensor, batch, busy, args.repeats)
        fast = timed(traced.embed_tensor, batch, busy, args.repeats)
        print(f"| {busy} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x |", flush=True)
    before = resident_mb()
    for _ in range(args.retraces):
        again = Embedder(load_artifact(args.model, "cpu"), torch.device("cpu"))
        again.warmup()
        del again
    kept = (resident_mb() - before) / args.retraces
    print(
        f"\ntracing added {added:.0f} MB of resident memory; each of {args.retraces} further loads and "
        f"traces of the model, dropped again, left {kept:.1f} MB"
    )


if __name__ == "__main__":
    main()
