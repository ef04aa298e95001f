"""``animalid serve`` and ``demo`` bind their port before migrating or loading models: a port in use
fails at once, with a message, and nothing else has happened."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from apps import make_models_dir

from service import listening
from service.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_bind_refuses_a_port_in_use_and_gives_a_free_one(taken_port: int) -> None:
    with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{taken_port}"):
        listening.bind("127.0.0.1", taken_port)
    sock = listening.bind("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_port_in_use_fails_before_migrating_or_loading(
    command: str, taken_port: int, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    database = tmp_path / "data" / "animalid.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMALID_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "ANIMALID_DATABASE_URL": f"sqlite:///{database}",
            "ANIMALID_MODELS_DIR": str(models),
            "ANIMALID_AUTH_DISABLED": "true",
            "ANIMALID_CPU_THREADS": "1",
        }
    )
    argv = [sys.executable, "-m", "service.cli", command, "--host", "127.0.0.1", "--port", str(taken_port)]
    if command == "demo":
        argv += ["--data-dir", str(tmp_path / "data"), "--models-dir", str(models)]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{taken_port}" in done.stderr
    assert "startup complete" not in (done.stdout + done.stderr).lower()
    assert not database.exists(), "nothing was migrated"
