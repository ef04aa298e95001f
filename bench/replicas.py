"""Two API replicas on one Postgres database against one: identify throughput, and the delay from
an enroll on one replica to a match on the other.

Both servers are `animalid serve` subprocesses on loopback with the bundled demo dog model and
`--gallery` stored random vectors, on a fresh schema of the Postgres server at `--postgres-url`
(dropped afterwards). Throughput: `--clients` concurrent clients posting one real DogFaceNet photo,
all to replica A, or spread over A and B; the two alternate, `--repeats` runs each (median kept).
Delay: a new individual is enrolled on A with one demo gallery photo, and B is asked every 10 ms to
identify that photo until it answers with the new individual.

    PYTHONPATH=. python bench/replicas.py
    PYTHONPATH=. python bench/replicas.py --clients 8 --repeats 2 --enrolls 10
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psycopg
from sqlalchemy import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrent_identify import DEMO_MODEL, PHOTO, run_level  # noqa: E402
from identify_latency import ADMIN_KEY, SPECIES, free_port, populate, start_server  # noqa: E402

from service.db import migrate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GALLERY = REPO / "service" / "demo" / "gallery"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="identify requests per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enrolls", type=int, default=20, help="enroll-to-match delays measured")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def delay(a: httpx.Client, b: httpx.Client, photo: bytes) -> float:
    """Seconds from the enroll's response on A to B's first answer naming the new individual."""
    ext = f"delay-{uuid.uuid4().hex[:8]}"
    response = a.post(
        "/enroll", data={"species": SPECIES, "external_id": ext}, files={"images": ("p.jpg", photo)}
    )
    response.raise_for_status()
    new = response.json()["individual"]["id"]
    start = time.perf_counter()
    deadline = start + 30
    while time.perf_counter() < deadline:
        found = b.post(
            "/identify", data={"species": SPECIES, "top_k": "1"}, files={"image": ("q.jpg", photo)}
        )
        found.raise_for_status()
        candidates = found.json()["candidates"]
        if candidates and candidates[0]["individual_id"] == new:
            elapsed = time.perf_counter() - start
            a.delete(f"/individuals/{new}").raise_for_status()  # the next photo may be this one again
            return elapsed
        time.sleep(0.01)
    raise SystemExit(f"B did not find the individual enrolled on A within 30 s ({ext})")


def main() -> None:
    args = parse_args()
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = make_url(args.postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    url = make_url(args.postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    photo = PHOTO.read_bytes()
    photos = sorted(GALLERY.glob("*/*.jpg"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    servers = []
    try:
        with tempfile.TemporaryDirectory(prefix="animalid-bench-") as tmp:
            root = Path(tmp)
            (root / "models").mkdir()
            shutil.copytree(DEMO_MODEL, root / "models" / SPECIES)
            migrate.upgrade(url_text)
            populate(url_text, root / "models" / SPECIES, args.gallery, 10)
            print(
                f"replicas.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, "
                f"{os.cpu_count()} CPUs "
                f"(shared with other work: load average {os.getloadavg()[0]:.2f} at start); Postgres; "
                f"{args.threads} CPU thread(s) per replica; gallery {args.gallery:,} vectors"
            )
            ports = [free_port(), free_port()]
            for port in ports:
                servers.append(start_server(url_text, root, args.threads, port)[0])
            for port in ports:
                run_level(port, photo, 1, 10)  # warm-up
            runs: dict[str, list[float]] = {"one": [], "two": []}
            for rep in range(args.repeats):
                for name, target in (("one", ports[0]), ("two", ports)):
                    row = run_level(target, photo, args.clients, args.requests)
                    runs[name].append(row["throughput"])
                    print(
                        f"  {name} replica(s), {args.clients} clients, run {rep + 1}: "
                        f"{row['throughput']:.1f} req/s"
                    )
            one, two = float(np.median(runs["one"])), float(np.median(runs["two"]))
            print(
                f"throughput (median of {args.repeats}): one {one:.1f} req/s, two {two:.1f} req/s, "
                f"ratio {two / one:.2f}"
            )
            with (
                httpx.Client(
                    base_url=f"http://127.0.0.1:{ports[0]}", headers={"x-api-key": ADMIN_KEY}, timeout=60
                ) as a,
                httpx.Client(
                    base_url=f"http://127.0.0.1:{ports[1]}", headers={"x-api-key": ADMIN_KEY}, timeout=60
                ) as b,
            ):
                delays = [
                    delay(a, b, photos[i % len(photos)].read_bytes()) * 1000 for i in range(args.enrolls)
                ]
            print(
                f"enroll on A -> match on B ({args.enrolls} enrolls, polled every 10 ms, each poll an "
                "identify): "
                f"p50 {np.percentile(delays, 50):.0f} ms, p99 {np.percentile(delays, 99):.0f} ms, "
                f"max {max(delays):.0f} ms"
            )
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
