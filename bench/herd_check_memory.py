"""Peak memory and wall time of `animalid gallery check` against the size of the gallery.

For each size, a fresh SQLite database is migrated and filled straight through SQL with a synthetic
gallery (unit vectors of the demo dog card's width, a few photos per animal, ids in the service's own
format), the demo dog card is the served card, and `animalid gallery check --species dog` runs in its
own process. The figure is that process's peak resident set size (``ru_maxrss`` of the child). Two or
more sizes give the memory the check needs per stored vector: the slope between them.

    python bench/herd_check_memory.py                       # 20,000 and 100,000 vectors
    python bench/herd_check_memory.py --sizes 100000 400000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert

from service.db.migrate import upgrade
from service.db.models import Embedding, Image, Individual, ModelVersion, ModelVersionStatus, Species
from service.db.repository import vector_to_bytes
from service.db.session import make_engine

ROOT = Path(__file__).resolve().parents[1]
DEMO_CARD = ROOT / "service" / "demo" / "models" / "dog" / "model_card.json"
CHUNK = 20_000  # rows an insert carries


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000], help="stored vectors")
    parser.add_argument("--photos-per-animal", type=int, default=4)
    parser.add_argument("--max-queries", type=int, default=5000, help="the check's --max-queries")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def fill(url: str, card: dict[str, Any], size: int, per_animal: int, seed: int) -> None:
    """A species `dog` whose active model version is the card's, with ``size`` stored vectors."""
    rng = np.random.default_rng(seed)
    dim = int(card["embedding_dim"])
    engine = make_engine(url)
    with engine.begin() as conn:
        species_id = conn.execute(insert(Species).values(name="dog").returning(Species.id)).scalar_one()
        version_id = conn.execute(
            insert(ModelVersion)
            .values(
                species_id=species_id,
                version=card["model_version"],
                status=ModelVersionStatus.ACTIVE,
                embedding_dim=dim,
                preprocess_version="bench",
                card={},
            )
            .returning(ModelVersion.id)
        ).scalar_one()
        for start in range(0, size, CHUNK):
            photos = range(start, min(start + CHUNK, size))
            animals = {i // per_animal for i in photos}
            owner = {a: uuid.UUID(int=a + 1) for a in animals}
            new = [a for a in sorted(animals) if a * per_animal >= start]
            if new:
                conn.execute(insert(Individual), [{"id": owner[a], "species_id": species_id} for a in new])
            images = [uuid.UUID(int=(1 << 64) + i) for i in photos]
            conn.execute(
                insert(Image),
                [
                    {
                        "id": image,
                        "individual_id": owner[i // per_animal],
                        "sha256": f"{i:064x}",
                        "storage_path": f"bench/{i}",
                        "size_bytes": 1,
                        "width": 1,
                        "height": 1,
                        "format": "jpeg",
                    }
                    for i, image in zip(photos, images, strict=True)
                ],
            )
            vectors = rng.standard_normal((len(images), dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            conn.execute(
                insert(Embedding),
                [
                    {"image_id": image, "model_version_id": version_id, "vector": vector_to_bytes(v)}
                    for image, v in zip(images, vectors, strict=True)
                ],
            )
    engine.dispose()


def measure(size: int, args: argparse.Namespace, card: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'animalid.db'}"
        upgrade(url)
        started = time.perf_counter()
        fill(url, card, size, args.photos_per_animal, args.seed)
        filled = time.perf_counter() - started
        (folder / "models" / "dog").mkdir(parents=True)
        shutil.copy(DEMO_CARD, folder / "models" / "dog" / "model_card.json")
        env = os.environ | {
            "ANIMALID_DATABASE_URL": url,
            "ANIMALID_MODELS_DIR": str(folder / "models"),
            "ANIMALID_IMAGE_STORE_DIR": str(folder / "images"),
            "PYTHONPATH": str(ROOT),
        }
        command = [sys.executable, "-m", "service.cli", "gallery", "check", "--species", "dog"]
        command += ["--max-queries", str(args.max_queries)]
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if done.returncode != 0:
            raise SystemExit(f"the check failed on {size} vectors:\n{done.stderr}")
        if peak <= before:
            raise SystemExit("ru_maxrss did not grow: run each size in a fresh bench process")
        report = json.loads(done.stdout)
        return {
            "vectors": size,
            "individuals": report["individuals"],
            "fill_s": round(filled, 1),
            "check_s": round(wall, 1),
            "peak_rss_mb": round(peak / 1024, 1),
            "past_at_1pct": report["targets"][0]["herd_mates_past"],
        }


def main() -> None:
    args = parse_args()
    card = json.loads(DEMO_CARD.read_text())
    rows = [measure(size, args, card) for size in sorted(args.sizes)]
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"{card['embedding_dim']}-D vectors, {args.photos_per_animal} photos an animal"
    )
    print("| vectors | individuals | check wall time (s) | peak RSS of the check (MB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['vectors']:,} | {row['individuals']:,} | {row['check_s']} | {row['peak_rss_mb']} |")
    if len(rows) > 1:
        slope = (
            (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"])
            * 1e6
            / (rows[-1]["vectors"] - rows[0]["vectors"])
        )
        print(f"\nmemory per stored vector (slope): {slope:,.0f} bytes")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
