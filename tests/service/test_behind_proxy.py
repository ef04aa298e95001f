"""Behind a reverse proxy: ``animalid serve`` takes each client's address from the proxy's
X-Forwarded-For when the proxy is trusted (uvicorn's FORWARDED_ALLOW_IPS, which the scaled compose
stack sets), so one client's failed API key checks do not lock out the others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apps import READ, make_models_dir
from servers import Server


@pytest.fixture(params=["*", "192.0.2.1"], ids=["proxy-trusted", "proxy-not-trusted"])
def proxied(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> Iterator[Server]:
    """A server trusting every peer's X-Forwarded-For (the compose stack's setting), or only an
    address the test's requests do not come from."""
    running = Server(database_url, tmp_path, make_models_dir(tmp_path, artifacts, dog="dog"))
    running.env.update({"FORWARDED_ALLOW_IPS": request.param, "ANIMALID_AUTH_FAILURE_LIMIT": "3"})
    running.start()
    yield running
    running.stop()


def test_failed_key_checks_count_per_forwarded_client(proxied: Server) -> None:
    def get(client: str, headers: dict[str, str]) -> httpx.Response:
        return httpx.get(
            f"{proxied.url}/individuals",
            params={"species": "dog"},
            headers={**headers, "x-forwarded-for": client},
        )

    wrong = {"x-api-key": "not-a-key"}
    assert [get("203.0.113.7", wrong).status_code for _ in range(3)] == [401, 401, 401]
    locked = get("203.0.113.7", READ)
    assert locked.status_code == 429 and locked.json()["code"] == "too_many_requests"
    other = get("203.0.113.8", READ).status_code
    if proxied.env["FORWARDED_ALLOW_IPS"] == "*":
        assert other == 200  # another client behind the same proxy keeps its access
    else:
        assert other == 429  # an untrusted header is ignored: every client is the proxy
