"""Learn the enrolled dogs, measured through a running service: identification before and after a
fine-tune job, the job's wall time, and identify latency while the job runs against idle.

The dogs are the test individuals of the shipped dog model (service/demo/models/dog), never seen in
its training: its own split of ../shared/data/dogfacenet. Per dog, half of its photos (at least one)
are enrolled, in two enroll requests (two enrolment batches) when there are two or more; the other
half are identification queries. `animalid serve` and `animalid worker` run as separate processes
on loopback; the fine-tune is queued with `POST /species/dog/finetune` and the worker claims it.
After a promotion the API switches models itself (ANIMALID_MODEL_WATCH_S) and re-embeds the gallery.

    python bench/finetune_gallery.py --epochs 3                 # every test dog
    python bench/finetune_gallery.py --dogs 60 --epochs 2       # a smaller gallery

Printed: one JSON line per phase, then a summary line. Top-1: the best candidate is the right dog.
Wrong-match rate: the service answers `match` with another dog (at the card's threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from identify_latency import free_port, percentile

from training.artifact import read_card
from training.pipeline import held_out

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "service" / "demo" / "models" / "dog"
ADMIN_KEY = "bench-admin-key"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dogfacenet")
    parser.add_argument("--dogs", type=int, default=0, help="test dogs to use (0: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the API and of the worker")
    parser.add_argument("--latency-requests", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-url", help="default: a SQLite file in the work folder")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    return parser.parse_args()


def split_photos(data: Path, dogs: int, seed: int) -> dict[str, tuple[list[list[Path]], list[Path]]]:
    """dog -> (enrolment batches, query photos), for the shipped model's test dogs."""
    dataset = held_out(read_card(MODEL), data / "manifest.csv")
    photos: dict[str, list[Path]] = {}
    for sample in dataset.samples:
        photos.setdefault(sample.individual, []).append(sample.path)
    rng = random.Random(seed)
    names = sorted(photos)
    if dogs:
        names = sorted(rng.sample(names, min(dogs, len(names))))
    plan = {}
    for name in names:
        paths = sorted(photos[name])
        rng.shuffle(paths)
        enrolled, queries = paths[: max(1, len(paths) // 2)], paths[max(1, len(paths) // 2) :]
        batches = [enrolled[::2], enrolled[1::2]] if len(enrolled) >= 2 else [enrolled]
        plan[name] = (batches, queries)
    return plan


def env_for(root: Path, url: str, port: int, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")}
    env.update(
        ANIMALID_DATABASE_URL=url, ANIMALID_MODELS_DIR=str(root / "models"),
        ANIMALID_IMAGE_STORE_DIR=str(root / "images"), ANIMALID_JOBS_DIR=str(root / "jobs"),
        ANIMALID_API_KEYS=f"{ADMIN_KEY}:admin", ANIMALID_CPU_THREADS=str(threads),
        ANIMALID_WORKER_THREADS=str(threads), ANIMALID_PORT=str(port), ANIMALID_MODEL_WATCH_S="2",
        ANIMALID_DEVICE="cpu", PYTHONPATH=str(REPO),
    )  # fmt: skip
    return env


def spawn(root: Path, env: dict[str, str], name: str, *command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *command],
        cwd=root, env=env, stdout=(root / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def wait_ready(client: httpx.Client, server: subprocess.Popen[bytes], root: Path) -> None:
    for _ in range(1200):
        if server.poll() is not None:
            raise SystemExit((root / "api.log").read_text()[-3000:])
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit("the API did not become ready in 5 minutes")


def enroll(client: httpx.Client, plan: dict[str, tuple[list[list[Path]], list[Path]]]) -> int:
    count = 0
    for name, (batches, _) in plan.items():
        for batch in batches:
            files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in batch]
            client.post(
                "/enroll", data={"species": "dog", "external_id": name}, files=files
            ).raise_for_status()
            count += len(batch)
    return count


def identify_all(
    client: httpx.Client, plan: dict[str, tuple[list[list[Path]], list[Path]]]
) -> dict[str, float]:
    right = wrong = total = 0
    version = ""
    for name, (_, queries) in plan.items():
        for path in queries:
            response = client.post("/identify", data={"species": "dog"}, files={"image": path.read_bytes()})
            response.raise_for_status()
            body = response.json()
            version = body["model_version"]
            best = body.get("best") or (body.get("candidates") or [None])[0]
            is_right = best is not None and best["external_id"] == name
            right += is_right
            wrong += body["decision"] == "match" and not is_right
            total += 1
    return {"queries": total, "top1": round(right / total, 4), "wrong_match_rate": round(wrong / total, 4),
            "model_version": version}  # fmt: skip


def latencies(client: httpx.Client, images: list[bytes], count: int) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        client.post(
            "/identify", data={"species": "dog"}, files={"image": images[i % len(images)]}
        ).raise_for_status()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"requests": len(times), "p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(percentile(times, 99), 1)}  # fmt: skip


def main() -> None:
    args = parse_args()
    plan = split_photos(args.data, args.dogs, args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(MODEL, root / "models" / "dog")
    url = args.database_url or f"sqlite:///{root / 'animalid.db'}"
    port = free_port()
    env = env_for(root, url, port, args.threads)
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=root, env=env, check=True)
    server = spawn(root, env, "api", "serve")
    worker: subprocess.Popen[bytes] | None = None
    out: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used",
        "threads": args.threads,
        "epochs": args.epochs,
    }
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"x-api-key": ADMIN_KEY}, timeout=600
        ) as client:
            wait_ready(client, server, root)
            start = time.perf_counter()
            out["enrolled_images"] = enroll(client, plan)
            out["enroll_s"] = round(time.perf_counter() - start, 1)
            out["dogs"] = len(plan)
            out["before"] = identify_all(client, plan)
            print(json.dumps({"before": out["before"]}), flush=True)
            probes = [q.read_bytes() for _, qs in plan.values() for q in qs][:20]
            out["latency_idle"] = summary(latencies(client, probes, args.latency_requests))
            print(json.dumps({"latency_idle": out["latency_idle"]}), flush=True)

            job = client.post("/species/dog/finetune", json={"epochs": args.epochs, "lr": args.lr}).json()
            worker = spawn(root, env, "worker", "worker")
            busy: list[float] = []
            done = threading.Event()

            def follow() -> None:
                while not done.is_set():
                    state = client.get(f"/jobs/{job['id']}").json()
                    if state["status"] == "running" and state["progress"].get("stage") == "train":
                        busy.extend(latencies(client, probes, 5))
                    elif state["status"] not in ("queued", "running"):
                        done.set()
                    else:
                        time.sleep(0.5)

            thread = threading.Thread(target=follow)
            thread.start()
            thread.join(timeout=3600)
            done.set()
            final = client.get(f"/jobs/{job['id']}").json()
            out["job"] = {
                "status": final["status"],
                "error": final["error"],
                "decision": final["result"].get("decision"),
                "wall_s": final["result"].get("wall_s"),
                "claimed_to_finished_s": (
                    datetime.fromisoformat(final["finished_at"]) - datetime.fromisoformat(final["started_at"])
                ).total_seconds(),
                "champion": final["result"].get("champion"),
                "challenger": final["result"].get("challenger"),
                "progress": final["progress"],
            }
            out["latency_during_training"] = summary(busy) if busy else None
            print(
                json.dumps({"job": out["job"], "latency_during_training": out["latency_during_training"]}),
                flush=True,
            )
            if final["result"].get("decision") == "promoted":
                new_version = final["result"]["challenger"]["model_version"]
                start = time.perf_counter()
                for _ in range(2400):
                    species = client.get("/species/dog").json()
                    if species["model_version"] == new_version and species["status"] == "ready":
                        break
                    time.sleep(0.5)
                out["switch_s"] = round(time.perf_counter() - start, 1)
            out["after"] = identify_all(client, plan)
            print(json.dumps({"after": out["after"]}), flush=True)
    finally:
        for process in (worker, server):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(120)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
