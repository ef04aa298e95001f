"""``animalid serve`` in a subprocess, configured through ANIMALID_* like in production, for tests
that kill it (SIGKILL) and start it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from apps import ADMIN_KEY, READ_KEY
from ports import free_port

REPO = Path(__file__).resolve().parents[2]


class Server:
    """``animalid serve`` in a subprocess, configured through ANIMALID_* like in production."""

    def __init__(self, database_url: str, root: Path, models: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")},
            "ANIMALID_DATABASE_URL": database_url,
            "ANIMALID_MODELS_DIR": str(models),
            "ANIMALID_IMAGE_STORE_DIR": str(root / "images"),
            "ANIMALID_API_KEYS": f"{READ_KEY}:read,{ADMIN_KEY}:admin",
            "ANIMALID_CPU_THREADS": "1",
            "ANIMALID_PORT": str(self.port),
            "PYTHONPATH": str(REPO),
        }
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve"],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
