"""API key scopes, upload limits enforced before the body is read, and hostile image uploads."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from apps import ADMIN, ADMIN_KEY, READ, make_models_dir, make_settings
from apps import live_server as serve
from fastapi.testclient import TestClient
from imagegen import jpeg

from service.app import create_app
from service.errors import ConfigurationError
from service.security import ApiKeyring, Scope

OPEN = {("get", "/health"), ("get", "/ready")}
ADMIN_ONLY = {
    ("post", "/enroll"),
    ("patch", "/individuals/{individual_id}"),
    ("delete", "/individuals/{individual_id}"),
    ("post", "/individuals/{individual_id}/merge"),
    ("delete", "/individuals/{individual_id}/images/{image_id}"),
    ("post", "/species/{name}/reload"),
    ("get", "/review"),
    ("get", "/review/{review_id}"),
    ("get", "/review/{review_id}/image"),
    ("post", "/review/{review_id}/resolve"),
    ("get", "/status"),
    ("get", "/audit"),
    ("post", "/species/{name}/finetune"),
    ("post", "/species/{name}/herd-check"),
    ("post", "/jobs/{job_id}/cancel"),
}


def operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.app.openapi()
    return sorted((method, path) for path, item in spec["paths"].items() for method in item)


def call(client: TestClient, method: str, path: str, headers: dict[str, str]):  # noqa: ANN201
    ids = {key: uuid.uuid4() for key in ("individual_id", "image_id", "review_id", "job_id")}
    url = path.format(name="dog", **ids)
    return client.request(method, url, headers=headers)


def test_every_route_but_health_and_ready_needs_a_key(shared_client: TestClient) -> None:
    for method, path in operations(shared_client):
        for headers in ({"x-api-key": ""}, {"x-api-key": "not-a-real-key"}):
            response = call(shared_client, method, path, headers)
            if (method, path) in OPEN:
                assert response.status_code in (200, 503), (method, path)
            else:
                assert (response.status_code, response.json()["code"]) == (401, "unauthorized"), (
                    method,
                    path,
                )
                assert response.headers["www-authenticate"] == "ApiKey"


def test_read_scope_reads_and_admin_scope_writes(shared_client: TestClient) -> None:
    for method, path in operations(shared_client):
        if (method, path) in OPEN:
            continue
        as_reader = call(shared_client, method, path, READ)
        if (method, path) in ADMIN_ONLY:
            assert (as_reader.status_code, as_reader.json()["code"]) == (403, "forbidden"), (method, path)
        else:
            assert as_reader.status_code not in (401, 403), (method, path)
        as_admin = call(shared_client, method, path, ADMIN)
        assert as_admin.status_code not in (401, 403), (method, path)


def test_the_key_is_checked_before_the_body_is_parsed(shared_client: TestClient) -> None:
    garbage = b"--x\r\nthis is not multipart at all"
    headers = {"content-type": "multipart/form-data; boundary=x", "x-api-key": ""}
    response = shared_client.post("/enroll", content=garbage, headers=headers)
    assert response.status_code == 401
    headers["x-api-key"] = READ["x-api-key"]
    assert shared_client.post("/enroll", content=garbage, headers=headers).status_code == 403


def test_auth_off_must_be_explicit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(ConfigurationError, match="ANIMALID_AUTH_DISABLED"):
        create_app(make_settings(url, tmp_path, tmp_path, api_keys=""))
    with pytest.raises(ConfigurationError, match="scope"):
        create_app(make_settings(url, tmp_path, tmp_path, api_keys="longenoughkey:superuser"))
    with pytest.raises(ConfigurationError, match="8 characters"):
        create_app(make_settings(url, tmp_path, tmp_path, api_keys="short:read"))
    create_app(make_settings(url, tmp_path, tmp_path, api_keys="", auth_disabled=True))


def test_auth_disabled_serves_without_keys(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    settings = make_settings(database_url, tmp_path, models, api_keys="", auth_disabled=True)
    with TestClient(create_app(settings)) as client:
        enrolled = client.post(
            "/enroll", data={"species": "dog", "external_id": "a"}, files={"images": jpeg(1)}
        )
        assert enrolled.status_code == 201
        assert client.get("/individuals").json()["count"] == 1


def test_keys_are_kept_only_as_digests() -> None:
    ring = ApiKeyring.parse(f"{ADMIN_KEY}:admin, reader-key-2:read")
    assert ADMIN_KEY.encode() not in repr(ring).encode()
    assert all(len(digest) == 32 for digest, _ in ring.entries)
    principal = ring.authenticate(ADMIN_KEY)
    assert principal is not None and principal.scope is Scope.ADMIN and ADMIN_KEY not in principal.fingerprint
    assert ring.authenticate("reader-key-2").scope is Scope.READ  # type: ignore[union-attr]
    assert ring.authenticate(ADMIN_KEY + "x") is None
    with pytest.raises(ValueError, match="twice"):
        ApiKeyring.parse("samekey123:read,samekey123:admin")


# --- Upload limits -------------------------------------------------------------------------------


PART_HEADER = (
    b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
)


def asgi_post(
    app,  # noqa: ANN001
    headers: list[tuple[bytes, bytes]],
    chunk: int,
    chunks: int | None,
    first: bytes = PART_HEADER,
) -> tuple[int, int, bytes]:
    """POST /enroll straight into the ASGI app, the body an endless (or ``chunks`` long) stream of
    ``chunk`` bytes after ``first``; returns (status, receive calls, response body)."""
    calls = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        more = chunks is None or calls < chunks
        body = first if calls == 1 else b"x" * chunk
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/enroll",
        "raw_path": b"/enroll",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"x-api-key", ADMIN_KEY.encode()), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], calls, body


def test_declared_oversized_body_is_refused_without_reading_it(shared_client: TestClient) -> None:
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"1073741824")]
    status, calls, body = asgi_post(shared_client.app, headers, chunk=1 << 20, chunks=None)
    assert status == 413 and calls == 0
    assert b'"code":"payload_too_large"' in body


def test_streamed_body_is_cut_at_the_limit(shared_client: TestClient) -> None:
    limit = shared_client.app.state.settings.max_upload_bytes
    chunk = 1 << 20
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"transfer-encoding", b"chunked")]
    status, calls, body = asgi_post(shared_client.app, headers, chunk=chunk, chunks=None)
    assert status == 413 and b"payload_too_large" in body
    assert calls <= limit // chunk + 2  # it stopped reading at the limit, not at the end of the stream


def test_a_body_under_the_limit_is_parsed(shared_client: TestClient) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"3")]
    status, _, body = asgi_post(shared_client.app, headers, chunk=3, chunks=1, first=b"{{{")
    assert status == 400 and b"malformed_body" in body  # it reached the JSON parser


@pytest.fixture
def live_server(database_url: str, tmp_path: Path, artifacts: dict[str, Path]) -> Iterator[int]:
    """The app under uvicorn on a loopback port, in a thread of this process."""
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    with serve(create_app(make_settings(database_url, tmp_path, models))) as url:
        yield int(url.rsplit(":", 1)[1])


def test_real_server_answers_413_before_the_body_is_sent(live_server: int) -> None:
    with socket.create_connection(("127.0.0.1", live_server), timeout=10) as sock:
        sock.sendall(
            b"POST /enroll HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            + f"x-api-key: {ADMIN_KEY}\r\nContent-Length: 1073741824\r\n\r\n".encode()
        )
        start = time.monotonic()
        answer = b""
        while b"payload_too_large" not in answer:  # no body byte is ever sent
            part = sock.recv(65536)
            if not part:
                break
            answer += part
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"payload_too_large" in answer
    assert elapsed < 5


# Hostile and odd images: tests/service/hostile.py and test_hostile_images.py.


def test_an_oversized_upload_is_refused_with_payload_too_large(shared_client: TestClient) -> None:
    limit = shared_client.app.state.settings.max_upload_bytes
    big = b"\xff\xd8\xff" + b"\0" * limit
    response = shared_client.post("/identify", data={"species": "dog"}, files={"image": big}, headers=READ)
    assert (response.status_code, response.json()["code"]) == (413, "payload_too_large")
