"""Identify latency over HTTP next to the bare decode + forward + search, and enroll throughput.

The service runs as `animalid serve` in a subprocess on loopback, with a gallery of N stored vectors
(random unit vectors, inserted into the database before start-up, so start-up rebuilds the index
from the database as in production). The model is randomly initialised (its speed is that of a
trained one): ResNet18 at the default 112x112 input, or each backbone named with ``--models``, run
one after another and compared side by side at the end (the price of each choice on the CPU).
Queries are real DogFaceNet photos when
../shared/data is present (synthetic patterns otherwise). The bare pipeline runs in this process
with the same artifact, the same decoder, preprocessing, model and index code, and the same number
of CPU threads, while the server idles.

    .venv/bin/python bench/identify_latency.py                  # N = 100,000
    .venv/bin/python bench/identify_latency.py --gallery 10000 --requests 100
    .venv/bin/python bench/identify_latency.py --models resnet18:112 efficientnet_lite0:224:identity
    .venv/bin/python bench/identify_latency.py --models artifact:service/demo/models/dog artifact:runs/fused
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import httpx
import numpy as np
import torch
from PIL import Image
from sqlalchemy import insert

from service.db import migrate
from service.db.models import Embedding, Individual, ModelVersion, ModelVersionStatus, Species
from service.db.models import Image as ImageRow
from service.db.session import make_engine, make_sessionmaker
from service.ml.embedder import Embedder
from service.ml.images import decode_image
from service.runtime import image_policy
from service.services.galleries import build_gallery
from service.settings import Settings
from training.artifact import ModelCard, export_artifact, load_artifact, read_card
from training.model import EmbeddingNet
from training.preprocess import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]
DOGS = REPO.parent / "shared" / "data" / "dogfacenet"
ADMIN_KEY = "bench-admin-key"
SPECIES = "dog"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", type=int, default=100_000, help="stored vectors N")
    parser.add_argument("--per-individual", type=int, default=10, help="images per individual in the gallery")
    parser.add_argument("--requests", type=int, default=200, help="timed identify requests")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--enroll-images", type=int, default=48, help="images enrolled per throughput run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and FAISS, both sides")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["resnet18:112"],
        metavar="BACKBONE:HEIGHT[xWIDTH][:NECK] | artifact:PATH",
        help="models to compare, e.g. efficientnet_lite0:224:identity (neck default linear_bn, 512-D), or "
        "artifact:PATH for a dog artifact as it is (a fused model, say)",
    )
    parser.add_argument("--database-url", help="default: a SQLite file in the work folder")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    return parser.parse_args()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def query_images(count: int) -> tuple[list[bytes], str]:
    if (DOGS / "manifest.csv").is_file():
        with (DOGS / "manifest.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        picked = [rows[i] for i in np.random.default_rng(0).choice(len(rows), size=count, replace=False)]
        return [(DOGS / row["path"]).read_bytes() for row in picked], "DogFaceNet photos (224x224 JPEG)"
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((224, 224)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out, "synthetic 224x224 JPEG patterns (../shared/data not found)"


@dataclass(frozen=True)
class ModelChoice:
    backbone: str
    input_size: tuple[int, int]
    neck: str
    artifact: Path | None = None  # a dog artifact served as it is (e.g. a fused model)

    @classmethod
    def parse(cls, text: str) -> ModelChoice:
        if text.startswith("artifact:"):
            path = Path(text.removeprefix("artifact:"))
            card = read_card(path)
            return cls(card.architecture, card.preprocess.input_size, "", path)
        backbone, size, *rest = text.split(":")
        height, _, width = size.partition("x")
        return cls(backbone, (int(height), int(width or height)), rest[0] if rest else "linear_bn")

    def __str__(self) -> str:
        height, width = self.input_size
        if self.artifact is not None:
            return f"{self.artifact.name} ({self.backbone}) at {height}x{width}"
        return f"{self.backbone} at {height}x{width}, {self.neck} neck"


def build_model(root: Path, choice: ModelChoice) -> Path:
    if choice.artifact is not None:
        return Path(shutil.copytree(choice.artifact, root / "models" / SPECIES))
    torch.manual_seed(0)
    net = EmbeddingNet(embedding_dim=512, backbone=choice.backbone, neck=choice.neck).eval()
    card = ModelCard(
        species=SPECIES, embedding_dim=net.embedding_dim, threshold=0.5, architecture=net.architecture,
        preprocess=PreprocessSpec(input_size=choice.input_size),
    )  # fmt: skip
    return export_artifact(net, card, root / "models" / SPECIES)


def populate(url: str, artifact: Path, n: int, per_individual: int) -> tuple[int, float]:
    """Species, active model version, individuals, images and random unit embeddings, in bulk."""
    card = load_artifact(artifact).card
    engine = make_engine(url)
    start = time.perf_counter()
    now = datetime.now(UTC)
    rng = np.random.default_rng(1)
    with make_sessionmaker(engine)() as session:
        species = Species(name=SPECIES)
        session.add(species)
        session.flush()
        version = ModelVersion(
            species_id=species.id, version=card.model_version, status=ModelVersionStatus.ACTIVE,
            embedding_dim=card.embedding_dim, preprocess_version=card.preprocess.version,
            threshold=card.threshold, card=card.to_dict(), activated_at=now,
        )  # fmt: skip
        session.add(version)
        session.flush()
        individuals = [uuid.uuid4() for _ in range(-(-n // per_individual))]
        session.execute(
            insert(Individual),
            [
                {"id": i, "species_id": species.id, "external_id": f"bench-{k}", "metadata_": {},
                 "created_at": now, "updated_at": now}
                for k, i in enumerate(individuals)
            ],
        )  # fmt: skip
        for start_row in range(0, n, 20_000):
            rows = range(start_row, min(n, start_row + 20_000))
            images = [uuid.uuid4() for _ in rows]
            vectors = rng.standard_normal((len(images), card.embedding_dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            session.execute(
                insert(ImageRow),
                [
                    {"id": image, "individual_id": individuals[r // per_individual],
                     "sha256": secrets.token_hex(32), "storage_path": "bench/none.jpg", "size_bytes": 0,
                     "width": 224, "height": 224, "format": "JPEG", "created_at": now, "updated_at": now}
                    for r, image in zip(rows, images, strict=True)
                ],
            )  # fmt: skip
            session.execute(
                insert(Embedding),
                [
                    {"image_id": image, "model_version_id": version.id,
                     "vector": vector.astype("<f4").tobytes(), "created_at": now}
                    for image, vector in zip(images, vectors, strict=True)
                ],
            )  # fmt: skip
        session.commit()
        version_id = version.id
    engine.dispose()
    return version_id, time.perf_counter() - start


def start_server(
    url: str, root: Path, threads: int, port: int, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")}
    env.update(
        ANIMALID_DATABASE_URL=url, ANIMALID_MODELS_DIR=str(root / "models"),
        ANIMALID_IMAGE_STORE_DIR=str(root / "images"), ANIMALID_API_KEYS=f"{ADMIN_KEY}:admin",
        ANIMALID_CPU_THREADS=str(threads), ANIMALID_PORT=str(port), PYTHONPATH=str(REPO),
    )  # fmt: skip
    env.update(extra_env or {})
    log = (root / "server.log").open("wb")
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    while True:
        if process.poll() is not None:
            raise SystemExit((root / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return process, time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def time_http(
    client: httpx.Client, images: list[bytes], args: argparse.Namespace
) -> tuple[list[float], dict[str, list[float]]]:
    """Client-observed latencies, and the server's own timings of each request (from the response)."""
    data = {"species": SPECIES, "top_k": str(args.top_k), "include_timings": "true"}
    for i in range(args.warmup):
        client.post("/identify", data=data, files={"image": images[i % len(images)]}).raise_for_status()
    times = []
    server: dict[str, list[float]] = {"decode": [], "forward": [], "search": [], "total": []}
    for i in range(args.requests):
        start = time.perf_counter()
        response = client.post("/identify", data=data, files={"image": images[i % len(images)]})
        body = response.json()
        times.append((time.perf_counter() - start) * 1000.0)
        response.raise_for_status()
        for name, key in (
            ("decode", "decode_ms"),
            ("forward", "embed_ms"),
            ("search", "search_ms"),
            ("total", "total_ms"),
        ):
            server[name].append(body["timings"][key])
    return times, server


def time_bare(url: str, artifact: Path, version_id: int, images: list[bytes], args: argparse.Namespace):  # noqa: ANN201
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    engine = make_engine(url)
    dim = load_artifact(artifact).card.embedding_dim
    gallery = build_gallery(make_sessionmaker(engine), version_id, dim, use_gpu=None)
    engine.dispose()
    embedder = Embedder(load_artifact(artifact, "cpu"), torch.device("cpu"))
    embedder.warmup()
    policy = image_policy(Settings(_env_file=None))  # the service's default decode limits
    parts: dict[str, list[float]] = {"decode": [], "forward": [], "search": [], "total": []}
    for i in range(args.warmup + args.requests):
        t0 = time.perf_counter()
        decoded = decode_image(images[i % len(images)], policy, embedder.card.preprocess.input_size)
        t1 = time.perf_counter()
        vector = embedder.embed([decoded.image])[0]
        t2 = time.perf_counter()
        gallery.search_individuals(vector, args.top_k)
        t3 = time.perf_counter()
        if i >= args.warmup:
            for name, value in (
                ("decode", t1 - t0),
                ("forward", t2 - t1),
                ("search", t3 - t2),
                ("total", t3 - t0),
            ):
                parts[name].append(value * 1000.0)
    return parts, len(gallery)


def time_enroll(client: httpx.Client, images: list[bytes], per_request: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(images), per_request):
        batch = images[first : first + per_request]
        files = [("images", (f"{k}.jpg", data, "image/jpeg")) for k, data in enumerate(batch)]
        response = client.post(
            "/enroll", data={"species": SPECIES, "external_id": f"new-{uuid.uuid4()}"}, files=files
        )
        response.raise_for_status()
    return len(images) / (time.perf_counter() - start)


def measure(choice: ModelChoice, root: Path, images: list[bytes], args: argparse.Namespace) -> dict:
    """One model's identify latency (HTTP and bare) and enroll throughput; prints its tables."""
    root.mkdir(parents=True, exist_ok=True)
    url = args.database_url or f"sqlite:///{root / 'bench.db'}"
    artifact = build_model(root, choice)
    migrate.upgrade(url)
    version_id, fill_s = populate(url, artifact, args.gallery, args.per_individual)
    dim = load_artifact(artifact).card.embedding_dim
    print(f"\n### {choice} ({dim}-D embeddings)\n")
    port = free_port()
    server, start_s = start_server(url, root, args.threads, port)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"x-api-key": ADMIN_KEY}, timeout=60
        ) as http:
            http_times, server_parts = time_http(http, images, args)
            parts, index_size = time_bare(url, artifact, version_id, images, args)
            one = time_enroll(http, images[: args.enroll_images], 1)
            eight = time_enroll(http, images[args.enroll_images : 2 * args.enroll_images], 8)
    finally:
        server.terminate()
        server.wait(30)
    assert index_size == args.gallery
    print(
        f"database filled in {fill_s:.1f} s; "
        f"server start-up incl. index rebuild from the database: {start_s:.1f} s\n"
    )
    bare_p50, http_p50 = percentile(parts["total"], 50), percentile(http_times, 50)
    bare_p99, http_p99 = percentile(parts["total"], 99), percentile(http_times, 99)
    print(f"identify latency, {args.requests} sequential requests after {args.warmup} warm-up (ms):\n")
    print("| path | p50 | p99 | mean |")
    print("|---|---|---|---|")
    print(f"| HTTP POST /identify (loopback, multipart) | {http_p50:.1f} | {http_p99:.1f} | "
          f"{statistics.fmean(http_times):.1f} |")  # fmt: skip
    print(f"| bare decode + forward + search | {bare_p50:.1f} | {bare_p99:.1f} | "
          f"{statistics.fmean(parts['total']):.1f} |")  # fmt: skip
    for name in ("decode", "forward", "search"):
        values = parts[name]
        print(f"| - {name} | {percentile(values, 50):.2f} | {percentile(values, 99):.2f} | "
              f"{statistics.fmean(values):.2f} |")  # fmt: skip
    for name in ("total", "decode", "forward", "search"):
        values = server_parts[name]
        label = "inside the server (the response's timings)" if name == "total" else f"- {name}"
        print(f"| {label} | {percentile(values, 50):.2f} | {percentile(values, 99):.2f} | "
              f"{statistics.fmean(values):.2f} |")  # fmt: skip
    print(
        f"\nratio HTTP / bare: p50 {http_p50 / bare_p50:.2f}, p99 {http_p99 / bare_p99:.2f} "
        "(target p50 <= 1.3)\n"
    )
    print("enroll throughput over HTTP (sequential requests, a new individual per request):\n")
    print("| images per request | images/s |")
    print("|---|---|")
    print(f"| 1 | {one:.1f} |")
    print(f"| 8 | {eight:.1f} |")
    return {
        "dim": dim, "http_p50": http_p50, "http_p99": http_p99, "enroll8": eight,
        "forward_p50": percentile(parts["forward"], 50), "search_p50": percentile(parts["search"], 50),
    }  # fmt: skip


def main() -> None:
    args = parse_args()
    choices = [ModelChoice.parse(text) for text in args.models]
    with tempfile.TemporaryDirectory(prefix="animalid-bench-") as tmp:
        root = args.workdir or Path(tmp)
        images, source = query_images(max(64, args.enroll_images * 2))
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__} (CPU), "
            f"FAISS {faiss.__version__}, {args.threads} CPU thread(s) per side, "
            f"load average at start {os.getloadavg()[0]:.2f}"
        )
        print(
            f"gallery: {args.gallery:,} vectors, {args.gallery // args.per_individual:,} individuals, "
            f"database {(args.database_url or 'sqlite').split(':')[0]}; queries: {source}; top_k={args.top_k}"
        )
        results = {
            choice: measure(choice, root / f"model-{k}", images, args) for k, choice in enumerate(choices)
        }
    if len(results) > 1:
        print("\nside by side (ms; enroll in images/s at 8 images per request):\n")
        print("| model | embedding | HTTP identify p50 | p99 | forward p50 | search p50 | enroll |")
        print("|---|---|---|---|---|---|---|")
        for choice, r in results.items():
            print(f"| {choice} | {r['dim']} | {r['http_p50']:.1f} | {r['http_p99']:.1f} | "
                  f"{r['forward_p50']:.1f} | {r['search_p50']:.1f} | {r['enroll8']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
