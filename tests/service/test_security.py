"""API key scopes, upload limits enforced before the body is read, and hostile image uploads."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from apps import ADMIN, ADMIN_KEY, READ, make_models_dir, make_settings
from apps import live_server as serve
from fastapi.testclient import TestClient
from imagegen import encode, jpeg, photo
from PIL import Image

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
}


def operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.app.openapi()
    return sorted((method, path) for path, item in spec["paths"].items() for method in item)


def call(client: TestClient, method: str, path: str, headers: dict[str, str]):  # noqa: ANN201
    url = path.format(individual_id=uuid.uuid4(), image_id=uuid.uuid4(), name="dog", review_id=uuid.uuid4())
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


# --- Hostile and odd images ----------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def huge_png(width: int, height: int) -> bytes:
    """A few hundred bytes that claim width x height pixels (a decompression bomb's header)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n"
        + header
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b"")
    )


def huge_bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + info + b"\0" * 64


def corpus() -> dict[str, tuple[bytes, int, str | None]]:
    """name -> (bytes, expected status, expected code)."""
    good_jpeg, good_png = jpeg(1), encode(photo(1), "PNG")
    webp = encode(photo(2), "WEBP")
    broken_crc = bytearray(good_png)
    broken_crc[30] ^= 0xFF  # inside IHDR: the CRC no longer matches
    gif = encode(photo(3).convert("P"), "GIF")
    frames = [photo(3).convert("P"), photo(4).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    cmyk = encode(photo(5).convert("CMYK"), "JPEG")
    sixteen = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(sixteen, format="PNG")
    rgba = encode(photo(6).convert("RGBA"), "PNG")
    pgm = encode(photo(7).convert("L"), "PPM")
    return {
        "empty": (b"", 422, "image_unreadable"),
        "text": (b"hello, I am a photo", 415, "unsupported_media_type"),
        "random": (np.random.default_rng(0).bytes(5000), 415, "unsupported_media_type"),
        "gif_named_jpg": (gif, 415, "unsupported_media_type"),
        "animated_gif": (animated.getvalue(), 415, "unsupported_media_type"),
        "tiff": (encode(photo(1), "TIFF"), 415, "unsupported_media_type"),
        "pdf": (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", 415, "unsupported_media_type"),
        "fits": (b"SIMPLE  =                    T" + b" " * 2850, 415, "unsupported_media_type"),
        "jpeg_truncated": (good_jpeg[: len(good_jpeg) // 2], 422, "image_unreadable"),
        "jpeg_header_only": (good_jpeg[:20], 422, "image_unreadable"),
        "jpeg_magic_then_garbage": (b"\xff\xd8\xff" + b"\x00" * 500, 422, "image_unreadable"),
        "png_truncated": (good_png[: len(good_png) // 2], 422, "image_unreadable"),
        "png_bad_crc": (bytes(broken_crc), 422, "image_unreadable"),
        "webp_truncated": (webp[: len(webp) // 2], 422, "image_unreadable"),
        "png_30000x30000_header": (huge_png(30000, 30000), 413, "image_too_large"),
        "png_100000x100000_header": (huge_png(100000, 100000), 413, "image_too_large"),
        "bmp_20000x20000_header": (huge_bmp(20000, 20000), 413, "image_too_large"),
        "png_named_jpg": (good_png, 200, None),
        "webp": (webp, 200, None),
        "bmp": (encode(photo(2), "BMP"), 200, None),
        "cmyk_jpeg": (cmyk, 200, None),
        "png_16_bit_grey": (sixteen.getvalue(), 200, None),
        "png_rgba": (rgba, 200, None),
        "pgm": (pgm, 200, None),  # ORL's human faces are PGM files: training takes them, so does the service
        "ppm": (encode(photo(7), "PPM"), 200, None),
        "pgm_plain": (b"P2\n4 4\n255\n" + b"10 200 30 40\n" * 4, 200, None),
        "pgm_truncated": (pgm[: len(pgm) // 2], 422, "image_unreadable"),
        "pfm_float": (b"Pf\n2 2\n-1.0\n" + b"\0" * 16, 415, "unsupported_media_type"),
    }


@pytest.mark.parametrize("name", sorted(corpus()))
def test_hostile_uploads_get_4xx_never_5xx(shared_client: TestClient, name: str) -> None:
    data, status, code = corpus()[name]
    start = time.monotonic()
    identified = shared_client.post(
        "/identify", data={"species": "dog"}, files={"image": ("photo.jpg", data, "image/jpeg")}, headers=READ
    )
    elapsed = time.monotonic() - start
    assert identified.status_code == status, identified.text
    if code is not None:
        assert identified.json()["code"] == code
        assert elapsed < 2.0  # refused from the header, never decoded
    enrolled = shared_client.post(
        "/enroll",
        data={"species": "dog", "external_id": f"corpus-{name}"},
        files={"images": ("photo.jpg", data, "image/jpeg")},
    )
    assert enrolled.status_code == (201 if status == 200 else status), enrolled.text


def test_an_oversized_upload_is_refused_with_payload_too_large(shared_client: TestClient) -> None:
    limit = shared_client.app.state.settings.max_upload_bytes
    big = b"\xff\xd8\xff" + b"\0" * limit
    response = shared_client.post("/identify", data={"species": "dog"}, files={"image": big}, headers=READ)
    assert (response.status_code, response.json()["code"]) == (413, "payload_too_large")
