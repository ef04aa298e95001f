"""A real database outage: the app reaches Postgres through a TCP relay on loopback, and the relay
is stopped (connections cut, new ones refused) and started again mid-test."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from apps import ADMIN, READ, TestClient, make_models_dir, make_settings
from databases import postgres_url, provisioned_database
from imagegen import jpeg
from sqlalchemy import make_url

from service.app import create_app

pytestmark = pytest.mark.postgres


class Relay:
    """Forwards 127.0.0.1:<port> to the Postgres server. ``stop`` is the outage: every relayed
    connection is cut and the port refuses new ones until ``start``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def _spawn(self, target, *args) -> None:  # noqa: ANN001
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[tuple[str, Relay]]:
    with provisioned_database("postgres", tmp_path) as url:
        parsed = make_url(postgres_url())
        relay = Relay((parsed.host or "127.0.0.1", parsed.port or 5432))
        relay.start()
        try:
            yield (
                make_url(url).set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False),
                relay,
            )
        finally:
            relay.stop()


def test_a_database_outage_is_503_with_retry_after_and_identify_keeps_answering(
    relayed: tuple[str, Relay], tmp_path: Path, artifacts: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    url, relay = relayed
    settings = make_settings(url, tmp_path, make_models_dir(tmp_path, artifacts, dog="dog"))
    with TestClient(create_app(settings), headers=ADMIN) as client:
        made = client.post(
            "/enroll",
            data={"species": "dog", "external_id": "rex", "name": "Rex"},
            files={"images": jpeg(950)},
        ).json()
        caplog.set_level(logging.INFO)
        relay.stop()  # the outage

        for _ in range(5):
            found = client.post(
                "/identify", data={"species": "dog"}, files={"image": jpeg(950)}, headers=READ
            )
            assert found.status_code == 200, found.text
            body = found.json()
            assert body["names_available"] is False and body["decision"] == "match"
            assert body["best"]["individual_id"] == made["individual"]["id"] and body["best"]["name"] is None
        for request in (
            lambda: client.post(
                "/enroll", data={"species": "dog", "external_id": "max"}, files={"images": jpeg(951)}
            ),
            lambda: client.get("/individuals", headers=READ),
            lambda: client.get(f"/individuals/{made['individual']['id']}", headers=READ),
            lambda: client.post(
                "/verify",
                data={"species": "dog", "individual_id": made["individual"]["id"]},
                files={"image": jpeg(950)},
                headers=READ,
            ),
        ):
            refused = request()
            assert (refused.status_code, refused.json()["code"]) == (503, "database_unavailable"), (
                refused.text
            )
            assert refused.headers["retry-after"] == str(settings.database_retry_after_seconds)
        two_photos = client.post(
            "/verify", data={"species": "dog"}, files={"image": jpeg(950), "reference_image": jpeg(950, 1)}
        )
        assert two_photos.status_code == 200  # needs no database
        ready = client.get("/ready", headers={})
        assert ready.status_code == 503
        assert ready.json() == {
            "ready": False,
            "checks": {"database": "down", "models": "up", "indexes": "up"},
        }
        status = client.get("/status").json()
        assert status["database"]["ok"] is False and status["database"]["error"]

        relay.start()  # back
        again = client.post(
            "/enroll", data={"species": "dog", "external_id": "max"}, files={"images": jpeg(951)}
        )
        assert again.status_code == 201, again.text
        found = client.post(
            "/identify", data={"species": "dog"}, files={"image": jpeg(950)}, headers=READ
        ).json()
        assert found["names_available"] is True and found["best"]["name"] == "Rex"
        assert client.get("/ready").status_code == 200

    messages = [record.getMessage() for record in caplog.records]
    assert sum("database unreachable" in m for m in messages) == 1, messages
    assert sum("database reachable again" in m for m in messages) == 1, messages
    assert not [record for record in caplog.records if record.exc_info], "no traceback per request"
