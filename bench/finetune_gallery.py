"""Learn the enrolled animals, measured through a running service: identification before and after
a fine-tune job, the job's wall time, and identify latency while the job runs against idle.

Dogs (``--species dog``): the test individuals of the shipped dog model (service/demo/models/dog),
never seen in its training: its own split of ../shared/data/dogfacenet. Per dog, half of its photos
(at least one) are enrolled, in two enroll requests (two enrolment batches) when there are two or
more; the other half are identification queries.

Cattle (``--species cattle --model DIR``): every cow of the model's training data (its training,
validation and test cows: closed set), grouped by video clip with the group key the model was
trained with. Per cow, half of its clips (at least one) are enrolled, alternately in two enroll
requests (two enrolment batches); the photos of its other clips are the queries, so no clip is on
both sides. The configured strangers (the 10 ``openset-*`` cows) are never enrolled: their photos
are sent to identify, before and after, to count how many the service answers `match`.

`animalid serve` and `animalid worker` run as separate processes on loopback; the fine-tune is
queued with `POST /species/{species}/finetune` and the worker claims it. After a promotion the API
switches models itself (ANIMALID_MODEL_WATCH_S) and re-embeds the gallery. With ``--url`` the
script uses a service already running instead (the compose stack, say): its worker runs the job and
its own settings decide the promotion margins (``--promote-anyway`` then only records the intent).

    python bench/finetune_gallery.py --epochs 3                 # every test dog
    python bench/finetune_gallery.py --dogs 60 --epochs 2       # a smaller gallery
    python bench/finetune_gallery.py --species cattle \
        --model runs/study/cattle-from-dogs-128x64/artifacts/cattle --epochs 3

Printed: one JSON line per phase, then a summary line. Top-1: the best candidate is the right
animal. Right- and wrong-match rate: the service answers `match` with that animal, or with another
one; uncertain rate: it answers `uncertain` (a match held back by the minimum match confidence, or
in the review band). Strangers answered match: the share of stranger photos answered `match` with anyone.
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
from typing import Any

import httpx
from identify_latency import free_port, percentile

from training.artifact import ModelCard, read_card
from training.data import Dataset
from training.pipeline import card_config, held_out, stranger_dataset, trained_on

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_DATA = {"dog": DATA / "dogfacenet", "cattle": DATA / "holstein_cowface"}
DEFAULT_MODEL = {"dog": REPO / "service" / "demo" / "models" / "dog"}
ADMIN_KEY = "bench-admin-key"
MAX_IMAGES_PER_ENROLL = 256  # a cow's clips of one enrolment batch go in one request

# individual -> (enrolment batches, query photos)
Plan = dict[str, tuple[list[list[Path]], list[Path]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--species", choices=sorted(DEFAULT_DATA), default="dog")
    parser.add_argument("--model", type=Path, help="artifact folder to serve (dogs: the shipped one)")
    parser.add_argument("--data", type=Path, help="data folder with manifest.csv (default: the species' one)")
    parser.add_argument(
        "--individuals", "--dogs", type=int, default=0, help="individuals to enrol (0: all); strangers: all"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the API and of the worker")
    parser.add_argument("--latency-requests", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-url", help="default: a SQLite file in the work folder")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    parser.add_argument(
        "--url",
        help="a running service to use (say the compose stack) instead of starting an API and a worker "
        "here: it must serve --model for --species, with a worker and an empty gallery",
    )
    parser.add_argument("--api-key", default=ADMIN_KEY, help="its admin key (with --url)")
    parser.add_argument(
        "--promote-anyway",
        action="store_true",
        help="promotion margins -1, to measure what a promoted model does through the service, strangers "
        "included; a serving model with an open-set calibration is still kept when the job keeps too few "
        "animals out of training to calibrate the new one, and when the new one answers `match` for the "
        "kept-out animals (each left out of the gallery) more often than it and 1.5 times the target FPIR",
    )
    parser.add_argument(
        "--strangers",
        type=float,
        help="share of the gallery's animals the job keeps out of training to calibrate the new model "
        "(default: the server's ANIMALID_FINETUNE_STRANGERS); identification after the job is also "
        "reported for them apart",
    )
    args = parser.parse_args()
    args.data = args.data or DEFAULT_DATA[args.species]
    args.model = args.model or DEFAULT_MODEL.get(args.species)
    if args.model is None:
        parser.error(f"--model is required for {args.species}")
    return args


def enrolment_data(species: str, card: ModelCard, data: Path) -> tuple[Dataset, dict[str, str]]:
    """The photos to enrol and query (the model's test dogs; every cow of the model's data), grouped
    as the model's training grouped them, and each individual's part of the model's split."""
    dataset, split = trained_on(card, data / "manifest.csv")
    parts = {name: part for part in ("train", "val", "test") for name in getattr(split, part)}
    if species == "dog":
        try:
            dataset = held_out(card, data / "manifest.csv")
        except ValueError as error:
            raise SystemExit(f"{error} (--model)") from None
    return dataset, parts


def units_of(dataset: Dataset) -> dict[str, list[list[Path]]]:
    """individual -> its units of enrolment (its groups: single photos of dogs, clips of cows), in a
    fixed order."""
    return {
        name: [sorted(paths) for _, paths in sorted(groups.items())]
        for name, groups in grouped(dataset).items()
    }


def grouped(dataset: Dataset) -> dict[str, dict[str, list[Path]]]:
    """individual -> group key -> photos."""
    groups: dict[str, dict[str, list[Path]]] = {}
    for sample in dataset.samples:
        groups.setdefault(sample.individual, {}).setdefault(sample.group, []).append(sample.path)
    return groups


def split_units(units: dict[str, list[list[Path]]], count: int, seed: int) -> Plan:
    """Per individual, half of its units (at least one) enrolled, alternately in two enrolment
    batches when there are two or more; the photos of the other units are the queries."""
    rng = random.Random(seed)
    names = sorted(units)
    if count:
        names = sorted(rng.sample(names, min(count, len(names))))
    plan = {}
    for name in names:
        shuffled = list(units[name])
        rng.shuffle(shuffled)
        enrolled, queried = shuffled[: max(1, len(shuffled) // 2)], shuffled[max(1, len(shuffled) // 2) :]
        batches = [enrolled[::2], enrolled[1::2]] if len(enrolled) >= 2 else [enrolled]
        plan[name] = ([flat(batch) for batch in batches], flat(queried))
    return plan


def flat(units: list[list[Path]]) -> list[Path]:
    return [path for unit in units for path in unit]


def stranger_photos(card: ModelCard, data: Path) -> list[Path]:
    """Photos of the model's configured strangers (never enrolled); none when it has none."""
    dataset = stranger_dataset(card_config(card), data / "manifest.csv")
    return [] if dataset is None else sorted(s.path for s in dataset.samples)


def env_for(root: Path, url: str, port: int, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")}
    env.update(
        ANIMALID_DATABASE_URL=url, ANIMALID_MODELS_DIR=str(root / "models"),
        ANIMALID_IMAGE_STORE_DIR=str(root / "images"), ANIMALID_JOBS_DIR=str(root / "jobs"),
        ANIMALID_API_KEYS=f"{ADMIN_KEY}:admin", ANIMALID_CPU_THREADS=str(threads),
        ANIMALID_WORKER_THREADS=str(threads), ANIMALID_PORT=str(port), ANIMALID_MODEL_WATCH_S="2",
        ANIMALID_DEVICE="cpu", ANIMALID_MAX_IMAGES_PER_REQUEST=str(MAX_IMAGES_PER_ENROLL),
        PYTHONPATH=str(REPO),
    )  # fmt: skip
    return env


def spawn(root: Path, env: dict[str, str], name: str, *command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *command],
        cwd=root, env=env, stdout=(root / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def wait_ready(client: httpx.Client, server: subprocess.Popen[bytes] | None, root: Path) -> None:
    for _ in range(1200):
        if server is not None and server.poll() is not None:
            raise SystemExit((root / "api.log").read_text()[-3000:])
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit("the API did not become ready in 5 minutes")


def enroll(client: httpx.Client, species: str, plan: Plan) -> int:
    count = 0
    for name, (batches, _) in plan.items():
        for batch in batches:
            files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in batch]
            client.post(
                "/enroll", data={"species": species, "external_id": name}, files=files
            ).raise_for_status()
            count += len(batch)
    return count


def identify(client: httpx.Client, species: str, image: bytes) -> dict[str, Any]:
    response = client.post("/identify", data={"species": species}, files={"image": image})
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


Answer = tuple[str, bool, str]  # individual, right best candidate, decision


def identify_all(
    client: httpx.Client, species: str, plan: Plan, parts: dict[str, str] | None = None
) -> tuple[dict[str, Any], list[Answer]]:
    """Top-1 and wrong-match rate of the queries (per part of the model's split when there are
    several), and the answers."""
    answers: list[Answer] = []
    version = ""
    for name, (_, queries) in plan.items():
        for path in queries:
            body = identify(client, species, path.read_bytes())
            version = body["model_version"]
            best = body.get("best") or (body.get("candidates") or [None])[0]
            is_right = best is not None and best["external_id"] == name
            answers.append((name, is_right, body["decision"]))
    result: dict[str, Any] = rates(answers) | {"model_version": version}
    if parts and len({parts[name] for name in plan}) > 1:
        result["by_part"] = {
            part: rates([a for a in answers if parts[a[0]] == part])
            for part in ("train", "val", "test")
            if any(parts[a[0]] == part for a in answers)
        }
    return result, answers


def rates(answers: list[Answer]) -> dict[str, Any]:
    """Top-1 (the best candidate is right, whatever the decision), and the shares of queries answered
    `match` and right, `match` and wrong, and `uncertain`."""
    total = len(answers)

    def share(count: int) -> float:
        return round(count / total, 4)

    return {
        "queries": total,
        "top1": share(sum(right for _, right, _ in answers)),
        "right_match_rate": share(sum(right and decision == "match" for _, right, decision in answers)),
        "wrong_match_rate": share(sum(not right and decision == "match" for _, right, decision in answers)),
        "uncertain_rate": share(sum(decision == "uncertain" for _, _, decision in answers)),
    }


def identify_strangers(client: httpx.Client, species: str, photos: list[Path]) -> dict[str, Any]:
    """How many photos of never-enrolled animals the service answers `match` (with anyone)."""
    matched = sum(identify(client, species, path.read_bytes())["decision"] == "match" for path in photos)
    return {"queries": len(photos), "answered_match": matched, "match_rate": round(matched / len(photos), 4)}


def measure(
    client: httpx.Client, species: str, plan: Plan, parts: dict[str, str], strangers: list[Path]
) -> tuple[dict[str, Any], list[Answer]]:
    """Identification of the enrolled animals' queries, and of the strangers when there are any."""
    result, answers = identify_all(client, species, plan, parts)
    if strangers:
        result["strangers"] = identify_strangers(client, species, strangers)
    return result, answers


def learnt_apart(answers: list[Answer], kept_out: set[str]) -> dict[str, Any]:
    """Rates of the animals the job trained on and of those it kept out to calibrate, apart."""
    return {
        "trained": rates([a for a in answers if a[0] not in kept_out]),
        "kept_out": rates([a for a in answers if a[0] in kept_out]),
    }


def latencies(client: httpx.Client, species: str, images: list[bytes], count: int) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        identify(client, species, images[i % len(images)])
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"requests": len(times), "p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(percentile(times, 99), 1)}  # fmt: skip


def main() -> None:
    args = parse_args()
    card = read_card(args.model)
    dataset, parts = enrolment_data(args.species, card, args.data)
    plan = split_units(units_of(dataset), args.individuals, args.seed)
    strangers = stranger_photos(card, args.data)
    # Absolute: the API and the worker run in this folder, and read their paths from the environment.
    root = (args.keep or Path(tempfile.mkdtemp(prefix="finetune-bench-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(args.model, root / "models" / args.species)
    url = args.database_url or f"sqlite:///{root / 'animalid.db'}"
    port = free_port()
    env = env_for(root, url, port, args.threads)
    if args.promote_anyway:
        env.update(ANIMALID_PROMOTE_MIN_TOP1_GAIN="-1", ANIMALID_PROMOTE_MIN_FAR_DROP="-1")
    server: subprocess.Popen[bytes] | None = None
    if args.url is None:  # else the service at --url, with its own settings and worker
        subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=root, env=env, check=True)
        server = spawn(root, env, "api", "serve")
    worker: subprocess.Popen[bytes] | None = None
    out: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "species": args.species,
        "model_version": card.model_version,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used",
        "threads": args.threads,
        "epochs": args.epochs,
        "lr": args.lr,
        "promote_anyway": args.promote_anyway,
        "service": args.url or "started here",
    }
    try:
        with httpx.Client(
            base_url=args.url or f"http://127.0.0.1:{port}", headers={"x-api-key": args.api_key}, timeout=600
        ) as client:
            wait_ready(client, server, root)
            start = time.perf_counter()
            out["enrolled_images"] = enroll(client, args.species, plan)
            out["enroll_s"] = round(time.perf_counter() - start, 1)
            out["individuals"] = len(plan)
            out["enrolment_batches"] = sum(len(batches) for batches, _ in plan.values())
            before, answers_before = measure(client, args.species, plan, parts, strangers)
            out["before"] = before
            print(json.dumps({"before": out["before"]}), flush=True)
            probes = [q.read_bytes() for _, qs in plan.values() for q in qs][:20]
            out["latency_idle"] = summary(latencies(client, args.species, probes, args.latency_requests))
            print(json.dumps({"latency_idle": out["latency_idle"]}), flush=True)

            job = client.post(
                f"/species/{args.species}/finetune",
                json={"epochs": args.epochs, "lr": args.lr}
                | ({"strangers": args.strangers} if args.strangers is not None else {}),
            ).json()
            if args.url is None:
                worker = spawn(root, env, "worker", "worker")
            busy: list[float] = []
            done = threading.Event()

            def follow() -> None:
                while not done.is_set():
                    state = client.get(f"/jobs/{job['id']}").json()
                    if state["status"] == "running" and state["progress"].get("stage") == "train":
                        busy.extend(latencies(client, args.species, probes, 5))
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
                "kept_because": final["result"].get("kept_because"),
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
                    species = client.get(f"/species/{args.species}").json()
                    if species["model_version"] == new_version and species["status"] == "ready":
                        break
                    time.sleep(0.5)
                out["switch_s"] = round(time.perf_counter() - start, 1)
            after, answers_after = measure(client, args.species, plan, parts, strangers)
            out["after"] = after
            calibration = (final["result"].get("challenger") or {}).get("calibration") or {}
            if calibration.get("kept_out"):
                before["learnt_apart"] = learnt_apart(answers_before, set(calibration["kept_out"]))
                after["learnt_apart"] = learnt_apart(answers_after, set(calibration["kept_out"]))
            print(json.dumps({"after": out["after"]}), flush=True)
    finally:
        for process in (worker, server):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(120)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
