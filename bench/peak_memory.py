"""Peak memory of one request with the worst inputs an allowed request can carry.

Each scenario runs in a fresh Python process: the app (the bundled 112 px dog model, SQLite, the
default limits) starts under Starlette's TestClient, serves one small warm-up identify, and then
the scenario's requests. A thread samples the process's resident set size (``/proc/self/statm``) every
2 ms while the scenario's requests run; the figure is the highest sample minus the resident size
just before: what the requests added at their worst moment. (``ru_maxrss`` would not do: start-up
peaks higher than the requests.)
The inputs are generated here: greyscale 16-bit and RGBA gradients at 6320 x 6320 (39.9 Mpx, just
under the default 40 Mpx per image), which compress to a few hundred KB, and a JPEG of that size.

    python bench/peak_memory.py                 # every scenario
    python bench/peak_memory.py --only identify-png16
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIDE = 6320  # 39.9 Mpx, under the default ANIMALID_MAX_IMAGE_PIXELS of 40,000,000
KEY = "bench-admin-key-0001"
PAGE = os.sysconf("SC_PAGE_SIZE")


def gradient(side: int, channels: int) -> np.ndarray:
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    plane = np.add.outer(ramp, ramp) / 2
    if channels == 1:
        return (plane * 65535).astype(np.uint16)
    layers = [plane, plane[::-1], plane[:, ::-1], np.full_like(plane, 0.8)][:channels]
    return (np.stack(layers, axis=-1) * 255).astype(np.uint8)


def make_inputs(folder: Path) -> dict[str, Path]:
    images = {
        "png16": (Image.fromarray(gradient(SIDE, 1)), "PNG", {}),
        "rgba": (Image.fromarray(gradient(SIDE, 4), mode="RGBA"), "PNG", {}),
        "jpeg": (Image.fromarray(gradient(SIDE, 3)), "JPEG", {"quality": 90}),
    }
    paths = {}
    for name, (image, fmt, options) in images.items():
        path = folder / f"{name}.{fmt.lower()}"
        image.save(path, format=fmt, **options)
        paths[name] = path
    return paths


# name -> (route, image file, images per request, concurrent requests, what it shows)
SCENARIOS = {
    "identify-png16": ("/identify", "png16", 1, 1, "one 16-bit greyscale PNG"),
    "identify-rgba": ("/identify", "rgba", 1, 1, "one RGBA PNG (alpha: the worst case)"),
    "identify-jpeg": ("/identify", "jpeg", 1, 1, "one JPEG (decoded in draft mode)"),
    "identify-png16-x4": ("/identify", "png16", 1, 4, "4 concurrent identifies, 16-bit PNG"),
    "enroll-png16-x5": ("/enroll", "png16", 5, 1, "one enroll of 5 (the pixel budget's most)"),
    "enroll-png16-x16": ("/enroll", "png16", 16, 1, "one enroll of 16 (over the upload and pixel limits)"),
}


def run_scenario(name: str, inputs: dict[str, Path], work: Path) -> dict:
    """In this (fresh) process: start the app, warm up, run the scenario, report."""
    import torch
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.db import migrate
    from service.settings import Settings

    torch.set_num_threads(1)
    route, image, count, concurrent, _ = SCENARIOS[name]
    url = f"sqlite:///{work / 'animalid.db'}"
    migrate.upgrade(url)
    models = work / "models"
    models.mkdir()
    (models / "dog").symlink_to(ROOT / "service" / "demo" / "models" / "dog")
    settings = Settings(
        database_url=url,
        models_dir=models,
        image_store_dir=work / "images",
        api_keys=f"{KEY}:admin",
        cpu_threads=1,
        _env_file=None,
    )
    data = inputs[image].read_bytes()
    with TestClient(create_app(settings), headers={"x-api-key": KEY}) as client:
        small = io.BytesIO()
        Image.fromarray(gradient(200, 3)).save(small, format="JPEG")
        client.post(
            "/identify", data={"species": "dog"}, files={"image": small.getvalue()}
        ).raise_for_status()
        before = resident_mb()
        statuses: list[int] = []
        highest = [before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.002):
                highest[0] = max(highest[0], resident_mb())

        sampler = threading.Thread(target=sample)
        sampler.start()

        def one(n: int) -> None:
            if route == "/enroll":
                files = [("images", (f"{i}.png", data, "application/octet-stream")) for i in range(count)]
                fields = {"species": "dog", "external_id": f"bench-{n}"}
                response = client.post("/enroll", data=fields, files=files)
            else:
                response = client.post("/identify", data={"species": "dog"}, files={"image": data})
            statuses.append(response.status_code)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(concurrent)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sampling.set()
        sampler.join()
    return {
        "scenario": name,
        "body_kb": round(len(data) * count / 1024),
        "statuses": sorted(statuses),
        "baseline_mb": round(before),
        "added_mb": round(highest[0] - before),
    }


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # a child process runs one
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        inputs = {key: Path(value) for key, value in json.loads(args.inputs).items()}
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(run_scenario(args.scenario, inputs, Path(work))))
        return 0

    with tempfile.TemporaryDirectory() as folder:
        inputs = make_inputs(Path(folder))
        encoded = json.dumps({key: str(value) for key, value in inputs.items()})
        print(
            f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
            f"python {platform.python_version()}"
        )
        print(
            f"# inputs {SIDE}x{SIDE}: "
            + ", ".join(f"{k} {v.stat().st_size // 1024} KB" for k, v in inputs.items())
        )
        print("| scenario | what | body (KB) | statuses | RSS before (MB) | peak added (MB) |")
        print("|---|---|---:|---|---:|---:|")
        for name in args.only or list(SCENARIOS):
            child = subprocess.run(
                [sys.executable, __file__, "--scenario", name, "--inputs", encoded],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's code, not an installed one
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                print(f"| {name} | failed: {child.stderr.strip().splitlines()[-1:]} | | | | |")
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            what = SCENARIOS[name][4]
            print(
                f"| {name} | {what} | {row['body_kb']} | {' '.join(map(str, row['statuses']))} "
                f"| {row['baseline_mb']} | {row['added_mb']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
