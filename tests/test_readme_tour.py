"""The README's tour runs as written: its shell block, against ``animalid demo`` on a free port.

The block is taken from the README, not copied here; only the demo's address changes (the tests
never use a fixed port). ``curl`` gets ``--fail-with-body`` so that an HTTP error fails the run,
and ``animalid`` is this checkout's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_ADDRESS = "http://127.0.0.1:8000"


def tour_block() -> str:
    text = README.read_text()
    section = text[text.index("## A short tour") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the tour has one sh block"
    return blocks[0]


def test_the_tour_names_no_placeholder() -> None:
    block = tour_block()
    assert DEMO_ADDRESS in block
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-", block), "a literal UUID cannot be right"
    for photo in re.findall(r"@(\S+\.jpg)", block):
        assert (ROOT / photo).is_file(), photo
    for endpoint in ("/enroll", "/identify", "/verify", "/explain", "/individuals", "/species"):
        assert f"$API{endpoint}" in block


def test_the_readme_tour_runs_against_the_demo(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("no curl installed")
    (tmp_path / "service").symlink_to(ROOT / "service")  # the tour's paths, from "the clone's root"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")}
    env |= {"PYTHONPATH": str(ROOT), "ANIMALID_CPU_THREADS": "1", "PYTHON": sys.executable}
    demo = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--port", str(port), "--data-dir", str(tmp_path / "d")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert demo.poll() is None, demo.stdout.read() if demo.stdout else ""
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo did not become ready"
            time.sleep(0.5)
        script = "\n".join(
            [
                "set -euo pipefail",
                'curl() { command curl --fail-with-body "$@"; }',
                'animalid() { "$PYTHON" -m service.cli "$@"; }',
                tour_block().replace(DEMO_ADDRESS, url),
            ]
        )
        done = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        demo.terminate()
        demo.wait(60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert '"individual_created":true' in out and '"external_id":"kennel-7/rex"' in out
    assert '"decision":"match","threshold"' in out  # identify
    assert '"best":{"individual_id"' in out and '"name":"Rex"' in out
    assert (tmp_path / "explain.png").read_bytes().startswith(b"\x89PNG")
    gallery = sorted((ROOT / "service" / "demo" / "gallery").iterdir())
    photos = sum(len(list(folder.iterdir())) for folder in gallery)
    assert f"{len(gallery)} individuals (0 new): 0 photos enrolled now, {photos} already enrolled" in out
    assert re.search(r"service/demo/queries/72\.jpg: match 72 \(", out)
    assert re.search(r"service/demo/tour/115\.2\.jpg: match kennel-7/rex \(", out)
