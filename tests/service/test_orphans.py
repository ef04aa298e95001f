"""Orphan image files: a server killed (SIGKILL) after writing an image file but before the row
that points at it commits leaves a file with no row; the next start removes it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from apps import ADMIN, make_models_dir
from databases import libpq
from imagegen import jpeg
from servers import Server
from sqlalchemy import create_engine, make_url, select

from service.db.models import Image


@contextmanager
def image_inserts_blocked(database_url: str) -> Iterator[None]:
    """Another connection holds a lock that lets the service read but not insert image rows."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        import sqlite3

        conn = sqlite3.connect(url.database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # the write lock; WAL readers go on
    else:
        conn = psycopg.connect(libpq(database_url))
        conn.execute("LOCK TABLE images IN SHARE MODE")  # SELECT passes, INSERT waits
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


def stored_files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def rows(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(select(Image.storage_path)))
    finally:
        engine.dispose()


def enroll_until_killed(url: str) -> None:
    """An enroll the server never answers: it is killed while the request waits for the lock."""
    try:
        httpx.post(
            f"{url}/enroll",
            data={"species": "dog", "external_id": "rex"},
            files={"images": jpeg(961)},
            headers=ADMIN,
            timeout=60,
        )
    except httpx.TransportError:
        return
    raise AssertionError("the enroll was answered")


@pytest.fixture
def server(database_url: str, tmp_path: Path, artifacts: dict[str, Path]) -> Iterator[Server]:
    running = Server(database_url, tmp_path, make_models_dir(tmp_path, artifacts, dog="dog"))
    running.env["ANIMALID_ORPHAN_GRACE_SECONDS"] = "0"
    yield running
    running.stop()


def test_a_file_orphaned_by_sigkill_is_swept_at_the_next_start(server: Server, database_url: str) -> None:
    store = server.root / "images"
    server.start()
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as http:
        kept = http.post(
            "/enroll", data={"species": "dog", "external_id": "rex"}, files={"images": jpeg(960)}
        )
        assert kept.status_code == 201
    before = stored_files(store)

    with image_inserts_blocked(database_url):
        thread = threading.Thread(target=enroll_until_killed, args=(server.url,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        # The file is in place (renamed from its temporary name); its row waits for the lock.
        while not [path for path in stored_files(store) - before if not path.name.startswith(".tmp-")]:
            assert time.monotonic() < deadline, "the enroll never wrote its file"
            time.sleep(0.02)
        server.kill()
    thread.join(60)
    orphan = stored_files(store) - before
    assert len(orphan) == 1 and not any(path.name.startswith(".tmp-") for path in orphan)
    assert {path.relative_to(store).as_posix() for path in orphan}.isdisjoint(rows(database_url))

    server.start()
    assert stored_files(store) == before  # the orphan is gone, the enrolled image stays
    assert "removed 1 orphan image files" in (server.root / "server.log").read_text()
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as http:
        assert "animalid_orphan_files_removed_total 1.0" in http.get("/metrics").text
        image_id = kept.json()["images"][0]["image_id"]
        assert (
            http.get(f"/individuals/{kept.json()['individual']['id']}/images/{image_id}/file").status_code
            == 200
        )


def test_the_sweep_waits_out_the_grace_period_and_removes_temporary_files(
    database_url: str, tmp_path: Path
) -> None:
    # Imported here, so that the SIGKILL test above runs (and fails) on code without the sweep.
    from service.db.session import make_engine, make_sessionmaker
    from service.image_store import ImageStore
    from service.metrics import Metrics
    from service.services import orphans

    store = ImageStore(tmp_path / "images")
    store.open()
    young = store.relative_path("dog", uuid.uuid4(), "jpg")
    store.write(young, b"x")
    (store.root / "dog" / ".tmp-abc.jpg").write_bytes(b"half")
    engine = make_engine(database_url)
    try:
        sessions = make_sessionmaker(engine)
        metrics = Metrics()
        assert orphans.sweep(sessions, store, 3600, metrics) == 0  # younger than the grace period
        assert orphans.sweep(sessions, store, 0, metrics) == 2  # the orphan and the temporary file
    finally:
        engine.dispose()
    assert stored_files(store.root) == set()
