"""Shared fixtures: real databases on both backends (see ``databases.py``), never mocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from browser import browser_state
from databases import BACKENDS, postgres_state, postgres_url, provisioned_database


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh migrated database for one test, on each backend."""
    with provisioned_database(backend, tmp_path) as url:
        yield url


@pytest.fixture
def ieee_fp32() -> Iterator[None]:
    """CUDA float32 convolutions and matrix products in full precision for one test. By default
    cuDNN's convolutions run in TF32 (10-bit mantissa), so a batch and single images, or CUDA and the
    CPU, differ by about 1e-3 (seen on an H200, docs/benchmarks.md): more than a test that compares
    their numbers allows, and nothing the service's code decides."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def database_factory(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Extra databases inside one test: ``factory(backend) -> url``."""
    counter = iter(range(1000))
    with ExitStack() as stack:

        def make(kind: str) -> str:
            folder = tmp_path / f"db{next(counter)}"
            folder.mkdir()
            return stack.enter_context(provisioned_database(kind, folder))

        yield make


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = postgres_state.skipped
    if skipped:
        terminalreporter.write_line(
            f"NOTICE: {skipped} Postgres test(s) were SKIPPED: no Postgres at {postgres_url()} "
            f"({postgres_state.error}). Set ANIMALID_TEST_POSTGRES_URL to run them; with CI set they fail.",
            yellow=True,
            bold=True,
        )
    if browser_state.skipped:
        terminalreporter.write_line(
            f"NOTICE: {browser_state.skipped} browser test(s) were SKIPPED: no headless Chromium "
            "(apt-get install chromium); with CI set they fail.",
            yellow=True,
            bold=True,
        )
