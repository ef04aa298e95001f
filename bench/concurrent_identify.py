"""Identify throughput and latency under 1, 8 and 32 concurrent clients, with and without dynamic
batching, against a real server with a real dog photo.

The server runs as `animalid serve` in a subprocess on loopback with the bundled demo dog model
(service/demo/models/dog, or `--model`; the script prints its version, backbone and input size) and
a gallery of `--gallery` stored random unit vectors (inserted into the database before start-up).
Every request posts the same real DogFaceNet photo (service/demo/queries/36.jpg). Each
configuration gets its own server start: batching off (ANIMALID_BATCH_WAIT_MS=0,
ANIMALID_SEARCH_BATCH_WAIT_MS=0) and on (the settings' defaults, or `--wait-ms`). `--servers N`
starts N servers per mode on the one database and device and spreads the clients over them in
turn (what replicas behind a balancer do with identify); `--client-processes P` shares the client
threads out among P processes. Next to them:
the bare forward pass in a fresh process at batch 1 and at batch 8 (same model, same thread count,
server stopped), the ceiling that one batching lane can reach; and the server's embedding batcher
alone in a fresh process, 8 threads calling it with no HTTP, search or database, with the server's
batching settings (what the rest of a request costs against it).

    PYTHONPATH=. python bench/concurrent_identify.py
    PYTHONPATH=. python bench/concurrent_identify.py --clients 1 8 --requests-per-client 10
    PYTHONPATH=. python bench/concurrent_identify.py --device cuda --servers 8 --client-processes 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from identify_latency import ADMIN_KEY, SPECIES, free_port, populate, start_server  # noqa: E402

from service.db import migrate  # noqa: E402
from service.ml.embedder import resolve_device  # noqa: E402
from service.runtime import GPU_BATCH_MAX_IMAGES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "service" / "demo" / "models" / SPECIES
PHOTO = REPO / "service" / "demo" / "queries" / "36.jpg"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", type=int, default=10_000, help="stored vectors")
    parser.add_argument(
        "--model", type=Path, default=DEMO_MODEL, help="artifact folder (default: the demo dog model)"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=12)
    parser.add_argument("--min-requests", type=int, default=60, help="at least this many per level")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the server (torch, FAISS)")
    parser.add_argument("--wait-ms", type=float, help="ANIMALID_BATCH_WAIT_MS when batching is on")
    parser.add_argument("--lanes", type=int, help="ANIMALID_BATCH_LANES when batching is on")
    parser.add_argument("--max-images", type=int, help="ANIMALID_BATCH_MAX_IMAGES when batching is on")
    parser.add_argument(
        "--batch-start", choices=["when-idle", "after-wait"],
        help="ANIMALID_BATCH_START when batching is on",
    )  # fmt: skip
    parser.add_argument(
        "--min-speedup", type=float, help="ANIMALID_BATCH_MIN_SPEEDUP when batching is on (0: any model)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per level and mode (median kept)")
    parser.add_argument(
        "--servers", type=int, default=1,
        help="server processes per mode on the one database and device, the clients spread over them "
        "in turn (what replicas behind a balancer do with identify)",
    )  # fmt: skip
    parser.add_argument(
        "--client-processes", type=int, default=1,
        help="processes the client threads are shared out among (one process's lock caps the clients "
        "at several hundred requests per second)",
    )  # fmt: skip
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="ANIMALID_DEVICE of the servers; the bare passes run on the same device",
    )  # fmt: skip
    return parser.parse_args()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def identify_form(photo: bytes) -> tuple[bytes, str]:
    """The identify request's multipart body and content type, built once: the clients share the
    server's cores, so they send prepared bytes over the standard library's HTTP connection rather
    than building each request anew (with httpx, 0.7 ms of CPU per request at one client and up to
    26 ms at 32 clients in one process, docs/benchmarks.md; 0.3-0.4 ms this way)."""
    boundary = "animalid-bench-boundary"
    parts = [
        f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (("species", SPECIES), ("top_k", "5"))
    ]
    parts.append(
        f'--{boundary}\r\ncontent-disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "content-type: image/jpeg\r\n\r\n".encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _client_threads(
    ports: list[int], photo: bytes, clients: int, total: int, start_line: Any
) -> tuple[list[float], list[str], float, float]:
    """``total`` identify requests from ``clients`` threads of this process, each with its own
    connection, spread over ``ports`` in turn; all start together at ``start_line`` (a barrier
    that the caller passes too). Returns the latencies, the errors, and the monotonic clock (one
    clock for every process of the machine) at the start and at the end."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))
    errors: list[str] = []

    body, content_type = identify_form(photo)
    headers = {"x-api-key": ADMIN_KEY, "content-type": content_type}

    def client(port: int) -> None:
        http = HTTPConnection("127.0.0.1", port, timeout=120)
        http.request("GET", "/health")  # connect before the clock starts
        http.getresponse().read()
        start_line.wait()
        try:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                http.request("POST", "/identify", body, headers)
                response = http.getresponse()
                text = response.read()
                elapsed = (time.perf_counter() - t0) * 1000.0
                with lock:
                    if response.status != 200:
                        errors.append(text[:200].decode(errors="replace"))
                    latencies.append(elapsed)
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(ports[i % len(ports)],)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    t0 = time.monotonic()
    for thread in threads:
        thread.join()
    return latencies, errors, t0, time.monotonic()


def _client_process(
    ports: list[int], photo: bytes, clients: int, total: int, start_line: Any, results: Any
) -> None:
    """One client process of a level run over several (see ``run_level``)."""
    cpu = time.process_time()
    latencies, errors, t0, t1 = _client_threads(ports, photo, clients, total, start_line)
    results.put((latencies, errors, t0, t1, time.process_time() - cpu))


def run_level(
    port: int | list[int],
    photo: bytes,
    clients: int,
    total: int,
    server_pids: list[int] | None = None,
    processes: int = 1,
) -> dict[str, float]:
    """``total`` identify requests from ``clients`` threads, each with its own connection; with
    several ports, the clients are spread over them in turn. With ``processes`` > 1 the client
    threads are shared out among that many processes, so that the clients' own Python is not one
    process's lock (the requests too, in proportion). With ``server_pids``, also the servers' CPU
    time per request, the clients', and the cores both kept busy on average."""
    ports = port if isinstance(port, list) else [port]
    server_pids = server_pids or []
    processes = max(1, min(processes, clients))
    server_cpu = sum(cpu_seconds(pid) for pid in server_pids)
    if processes == 1:
        cpu = time.process_time()
        start_line = threading.Barrier(clients + 1)  # every client thread and this one
        latencies, errors, t0, t1 = _client_threads(ports, photo, clients, total, start_line)
        outcome = [(latencies, errors, t0, t1, time.process_time() - cpu)]
    else:
        context = multiprocessing.get_context("spawn")
        shares = [len(range(j, clients, processes)) for j in range(processes)]
        requests = [total * share // clients for share in shares]
        for j in range(total - sum(requests)):
            requests[j] += 1
        start_line = context.Barrier(clients + processes)  # every client thread and each process's own
        results = context.Queue()
        workers = [
            context.Process(
                target=_client_process,
                args=(
                    [ports[i % len(ports)] for i in range(j, clients, processes)],
                    photo,
                    shares[j],
                    requests[j],
                    start_line,
                    results,
                ),
            )  # fmt: skip
            for j in range(processes)
        ]
        for worker in workers:
            worker.start()
        outcome = [results.get() for _ in workers]
        for worker in workers:
            worker.join()
    server_cpu = sum(cpu_seconds(pid) for pid in server_pids) - server_cpu
    latencies = [ms for row in outcome for ms in row[0]]
    errors = [error for row in outcome for error in row[1]]
    wall = max(row[3] for row in outcome) - min(row[2] for row in outcome)
    client_cpu = sum(row[4] for row in outcome)
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[0]}")
    values = np.asarray(latencies)
    usage = (
        {
            "server_cpu_ms": server_cpu / len(values) * 1000.0,
            "client_cpu_ms": client_cpu / len(values) * 1000.0,
            "cores": (server_cpu + client_cpu) / wall,
        }
        if server_pids
        else {}
    )
    return {
        "throughput": len(values) / wall,
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "p99": float(np.percentile(values, 99)),
    } | usage


def batch_metrics(port: int) -> str:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"x-api-key": ADMIN_KEY}).text
    found = {}
    for line in text.splitlines():
        for op in ("embed", "search"):
            if line.startswith("animalid_batch_items_") and f'operation="{op}"' in line:
                name = line.split("{")[0].removeprefix("animalid_batch_items_")
                if name in ("sum", "count"):
                    found[(op, name)] = float(line.rsplit(" ", 1)[1])
    parts = []
    for op in ("embed", "search"):
        count = found.get((op, "count"), 0.0)
        if count:
            parts.append(f"{op}: {int(count)} calls, {found[(op, 'sum')] / count:.2f} items per call")
    return "; ".join(parts)


def device_description(setting: str) -> str:
    device = resolve_device(setting)
    if device.type == "cpu":
        return "the CPU"
    return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"


def model_description(folder: Path) -> str:
    card = json.loads((folder / "model_card.json").read_text())
    height, width = card["input_size"]
    return f"{card['model_version']} ({card.get('backbone') or card['architecture']}, {height}x{width})"


def bare_forward(
    model: Path, threads: int, batch: int, device: str, repeats: int = 20, preprocess: bool = True
) -> float:
    """Images per second of the bare preprocessing + forward pass at ``batch`` (or the forward pass
    alone on a batch already on the device), measured in a fresh process set up like the server
    (same thread count, OMP_NUM_THREADS as `animalid serve` sets, the traced pass)."""
    step = "embedder.embed(images)" if preprocess else "embedder.embed_tensor(tensor)"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    code = (
        "import sys, time, torch\n"
        "from service.ml.embedder import Embedder, resolve_device\n"
        "from service.ml.images import ImagePolicy, decode_image\n"
        "from training.artifact import load_artifact\n"
        f"torch.set_num_threads({threads})\n"
        f"device = resolve_device({device!r})\n"
        f"embedder = Embedder(load_artifact({str(model)!r}, 'cpu'), device)\n"
        "embedder.warmup()\n"  # the traced pass, as the server's
        f"policy = ImagePolicy({40_000_000}, {40_000_000})\n"
        f"image = decode_image(open({str(PHOTO)!r}, 'rb').read(), policy).image\n"
        f"images = [image] * {batch}\n"
        "tensor = embedder.batch(images)\n"
        f"for _ in range(3): {step}\n"
        "t0 = time.perf_counter()\n"
        f"for _ in range({repeats}): {step}\n"
        f"print({batch * repeats} / (time.perf_counter() - t0))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def batcher_alone(
    model: Path,
    threads: int,
    clients: int,
    batching_env: dict[str, str],
    device: str,
    seconds: float = 10.0,
) -> float:
    """Images per second through the server's embedding batcher with no HTTP, search or database:
    ``clients`` threads each embedding the photo over and over, in a fresh process with the
    server's batching settings (the settings' defaults, overridden by ``batching_env``). What
    batching can give before the rest of a request takes its share of the cores."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), **batching_env}
    code = (
        "import threading, time, torch\n"
        "from service.ml.batching import BatchingConfig, EmbedBatcher\n"
        "from service.ml.embedder import Embedder, resolve_device\n"
        "from service.ml.images import ImagePolicy, decode_image\n"
        "from service.runtime import batch_lanes, batch_max_images\n"
        "from service.settings import Settings\n"
        "from training.artifact import load_artifact\n"
        f"torch.set_num_threads({threads})\n"
        f"settings, device = Settings(), resolve_device({device!r})\n"
        "config = BatchingConfig(settings.batch_wait_ms / 1000.0, batch_max_images(settings, device), "
        "batch_lanes(settings, device), settings.batch_start == 'when-idle', settings.batch_min_speedup)\n"
        f"embedder = Embedder(load_artifact({str(model)!r}, 'cpu'), device)\n"
        "embedder.warmup(config.max_items if config.min_speedup > 0 else 1)\n"  # as the server loads it
        "batcher = EmbedBatcher(embedder, config.for_model(embedder.batch_speedup))\n"
        f"policy = ImagePolicy({40_000_000}, {40_000_000})\n"
        f"image = decode_image(open({str(PHOTO)!r}, 'rb').read(), policy).image\n"
        "done, stop = [0], threading.Event()\n"
        "def client():\n"
        "    while not stop.is_set():\n"
        "        batcher.embed([image])\n"
        "        done[0] += 1\n"
        f"threads = [threading.Thread(target=client) for _ in range({clients})]\n"
        "for t in threads: t.start()\n"
        "time.sleep(2.0)\n"
        "start, t0 = done[0], time.perf_counter()\n"
        f"time.sleep({seconds})\n"
        "print((done[0] - start) / (time.perf_counter() - t0))\n"
        "stop.set()\n"
        "for t in threads: t.join()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    photo = PHOTO.read_bytes()
    with tempfile.TemporaryDirectory(prefix="animalid-bench-") as tmp:
        root = Path(tmp)
        (root / "models").mkdir()
        shutil.copytree(args.model, root / "models" / SPECIES)
        url = args.database_url or f"sqlite:///{root / 'bench.db'}"
        migrate.upgrade(url)
        populate(url, root / "models" / SPECIES, args.gallery, 10)
        batching = {
            name: str(value)
            for name, value in (
                ("ANIMALID_BATCH_WAIT_MS", args.wait_ms),
                ("ANIMALID_BATCH_LANES", args.lanes),
                ("ANIMALID_BATCH_MAX_IMAGES", args.max_images),
                ("ANIMALID_BATCH_START", args.batch_start),
                ("ANIMALID_BATCH_MIN_SPEEDUP", args.min_speedup),
            )
            if value is not None
        }
        print(
            f"concurrent_identify.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, "
            f"{os.cpu_count()} CPUs (shared with other work: load average "
            f"{os.getloadavg()[0]:.2f} at start); "
            f"{args.servers} server(s) per mode, {args.threads} thread(s) each, on "
            f"{device_description(args.device)}; clients in {args.client_processes} process(es); "
            f"dog model {model_description(args.model)}; "
            f"gallery {args.gallery:,} vectors; "
            f"photo {PHOTO.relative_to(REPO)}; batching on: {batching or 'the defaults'}"
        )
        device = {"ANIMALID_DEVICE": args.device}
        modes = {
            "off": {"ANIMALID_BATCH_WAIT_MS": "0", "ANIMALID_SEARCH_BATCH_WAIT_MS": "0", **device},
            "on": {**batching, **device},
        }
        # Both servers run side by side (an idle one costs nothing) and the modes alternate at each
        # level, so a burst of other work on the shared machine hits both alike.
        ports = {mode: [free_port() for _ in range(args.servers)] for mode in modes}
        with ThreadPoolExecutor(len(modes) * args.servers) as pool:  # their start-ups overlap
            started = {
                mode: [pool.submit(start_server, url, root, args.threads, port, env) for port in ports[mode]]
                for mode, env in modes.items()
            }
            servers = {mode: [future.result()[0] for future in futures] for mode, futures in started.items()}
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        try:
            for mode in modes:
                for port in ports[mode]:
                    run_level(port, photo, 1, 20)  # warm-up
                run_level(ports[mode], photo, max(args.clients), 4 * max(args.clients))  # and its threads
            for clients in args.clients:
                total = max(args.min_requests, clients * args.requests_per_client)
                for rep in range(args.repeats):
                    for mode in modes:
                        row = run_level(
                            ports[mode], photo, clients, total,
                            [server.pid for server in servers[mode]], args.client_processes,
                        )  # fmt: skip
                        runs.setdefault((mode, clients), []).append(row)
                        print(
                            f"  batching {mode:>3}, {clients:>2} clients, run {rep + 1}: "
                            f"{row['throughput']:6.1f} req/s  p50 {row['p50']:7.1f}  p95 {row['p95']:7.1f}  "
                            f"p99 {row['p99']:7.1f} ms; CPU per request: server "
                            f"{row['server_cpu_ms']:.1f} ms, clients {row['client_cpu_ms']:.1f} ms; "
                            f"{row['cores']:.2f} cores busy",
                            flush=True,
                        )
            for mode in modes:
                print(f"  batching {mode}: {batch_metrics(ports[mode][0])} (the first server)")
        finally:
            for server in (server for group in servers.values() for server in group):
                server.terminate()
                server.wait(30)
        results = {
            key: {m: float(np.median([r[m] for r in rows])) for m in rows[0]} for key, rows in runs.items()
        }
        sizes = [1, 8] if resolve_device(args.device).type == "cpu" else [1, 8, GPU_BATCH_MAX_IMAGES]
        bare = {size: bare_forward(args.model, args.threads, size, args.device) for size in sizes}
        alone_pass = {
            size: bare_forward(args.model, args.threads, size, args.device, preprocess=False)
            for size in sizes
        }
        alone = batcher_alone(args.model, args.threads, 8, batching, args.device)
    one, eight = bare[1], bare[8]
    print(
        f"\nbare forward pass (a fresh process, {args.threads} threads, {args.device}): "
        + ", ".join(f"batch {size} {rate:.1f} img/s" for size, rate in bare.items())
        + f"; the server's batcher alone, 8 threads calling it, no HTTP: {alone:.1f} img/s"
    )
    print(
        "forward pass alone, on a batch already preprocessed on the device: "
        + ", ".join(f"batch {size} {rate:.1f} img/s" for size, rate in alone_pass.items())
    )
    print(f"\nmedian of {args.repeats} runs per row:")
    print(
        "\n| batching | clients | req/s | p50 ms | p95 ms | p99 ms | server CPU ms per request "
        "| clients' CPU ms per request | cores busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, clients), row in results.items():
        print(
            f"| {mode} | {clients} | {row['throughput']:.1f} | "
            f"{row['p50']:.0f} | {row['p95']:.0f} | {row['p99']:.0f} | {row['server_cpu_ms']:.1f} | "
            f"{row['client_cpu_ms']:.1f} | {row['cores']:.2f} |"
        )
    for mode in modes:
        if (mode, 1) in results and (mode, 8) in results:
            base, eight_clients = results[(mode, 1)], results[(mode, 8)]
            print(
                f"batching {mode}: 8 clients / 1 client throughput "
                f"{eight_clients['throughput'] / base['throughput']:.2f}x (target >= 1.8); "
                f"p99 ratio {eight_clients['p99'] / base['p99']:.2f} (target <= 3); "
                f"8-client throughput / bare batch-8 forward {eight_clients['throughput'] / eight:.2f} "
                f"(target >= 0.8); / the batcher alone {eight_clients['throughput'] / alone:.2f}"
            )
    if GPU_BATCH_MAX_IMAGES in bare and ("off", 1) in results:
        best = max(row["throughput"] for (mode, _), row in results.items() if mode == "on")
        full, single = bare[GPU_BATCH_MAX_IMAGES], results[("off", 1)]["throughput"]
        print(
            f"GPU: best batched throughput / 1-client unbatched {best / single:.2f}x"
            f" (target >= 8); bare batch {GPU_BATCH_MAX_IMAGES} / batch 1 {full / one:.2f}x; "
            f"forward pass alone {alone_pass[GPU_BATCH_MAX_IMAGES] / alone_pass[1]:.2f}x"
        )


if __name__ == "__main__":
    main()
