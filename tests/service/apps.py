"""How the service tests build apps: tiny model artifacts, models folders, settings and API keys."""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from training.artifact import ModelCard, export_artifact, load_artifact
from training.fusion import Branch, fused_from
from training.model import FUSION_ARCHITECTURE, EmbeddingNet
from training.preprocess import PreprocessSpec

with warnings.catch_warnings():
    # Starlette 1.x says its TestClient will move from httpx to httpx2; nothing to do here yet.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

READ_KEY = "read-key-0001"
ADMIN_KEY = "admin-key-0001"
READ = {"x-api-key": READ_KEY}
ADMIN = {"x-api-key": ADMIN_KEY}
DOG_THRESHOLD = 0.8


def build_artifact(
    out: Path,
    species: str,
    seed: int = 0,
    threshold: float | None = DOG_THRESHOLD,
    input_size: tuple[int, int] = (64, 64),
    backbone: str = "resnet18",
) -> Path:
    """A random network (ResNet18 unless ``backbone`` says otherwise) at ``input_size`` (height,
    width) whose BatchNorm statistics come from random inputs.

    Without that calibration every photo embeds to nearly the same vector; with it, different
    synthetic individuals are far apart, so match and unknown decisions are meaningful.
    """
    torch.manual_seed(seed)
    net = EmbeddingNet(embedding_dim=512, backbone=backbone)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(16, 3, *input_size))
    net.eval()
    card = ModelCard(
        species=species,
        embedding_dim=512,
        architecture=net.architecture,
        preprocess=PreprocessSpec(input_size=input_size),
        threshold=threshold,
        threshold_far=0.01 if threshold is not None else None,
        metrics={"top1": 0.5, "note": f"random test model, seed {seed}"},
    )
    return export_artifact(net, card, out)


def build_fused_artifact(out: Path, parts: list[tuple[Path, float, dict[str, Any] | None]]) -> Path:
    """A fused model of the artifacts ``parts`` (path, weight, the training configuration its card
    records for that network: None as on cards fused before they recorded one)."""
    models, species = [], set()
    for path, weight, config in parts:
        loaded = load_artifact(path)
        assert isinstance(loaded.model, EmbeddingNet)
        branch = dataclasses.replace(Branch.of(loaded.card, weight), training_config=config)
        models.append((loaded.model, branch))
        species.add(loaded.card.species)
    model = fused_from(models)
    card = ModelCard(
        species=species.pop(),
        embedding_dim=model.embedding_dim,
        architecture=FUSION_ARCHITECTURE,
        preprocess=model.preprocess,
        threshold=DOG_THRESHOLD,
        threshold_far=0.01,
        fusion=model.specs,
    )
    return export_artifact(model, card, out)


def make_models_dir(root: Path, artifacts: dict[str, Path], **species: str) -> Path:
    """``root/models/<species>`` links to artifacts, e.g. ``make_models_dir(p, a, dog="dog_v2")``."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name, key in species.items():
        link = models / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(artifacts[key], target_is_directory=True)
    return models


def make_settings(database_url: str, root: Path, models_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "models_dir": models_dir,
        "image_store_dir": root / "images",
        "api_keys": f"{READ_KEY}:read,{ADMIN_KEY}:admin",
        "cpu_threads": 1,  # the test box has 2 shared cores; more threads only thrash
        "model_watch_s": 0,  # tests reload explicitly; a test of the watcher turns it on
        # Each trace keeps a few MB in the process for good (TorchScript's own state, docs/benchmarks.md)
        # and the suite starts hundreds of apps in one process: with them tracing it peaks at 8.8 GB
        # against 6.9 GB. The traced pass has tests of its own (test_traced_forward.py), and the
        # servers the suite starts as processes trace as deployed.
        "trace_forward": False,
        # Tests send many wrong keys from one address on purpose; the limit has tests of its own.
        "auth_failure_limit": 10_000,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


class AppRunner:
    """Apps started and stopped inside one test (restarts); whatever is left runs until teardown."""

    def __init__(self) -> None:
        self.running: list[TestClient] = []

    def start(self, settings: Settings, **kwargs: Any) -> TestClient:
        client = TestClient(create_app(settings, **kwargs), headers=ADMIN)
        client.__enter__()
        self.running.append(client)
        return client

    def stop(self, client: TestClient) -> None:
        self.running.remove(client)
        client.__exit__(None, None, None)

    def stop_all(self) -> None:
        for client in reversed(list(self.running)):
            self.stop(client)


@contextmanager
def live_server(app: FastAPI, startup_timeout: float = 180.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {startup_timeout} s")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
