"""The listening socket, bound before anything slow happens.

``animalid serve`` and ``demo`` bind their port first: a port in use then fails at once, before
migrations run and models load, instead of after "startup complete". uvicorn serves on the socket.
"""

from __future__ import annotations

import socket
from typing import Any

from service.errors import ConfigurationError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ConfigurationError when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def serve(app: Any, sock: socket.socket, log_level: str) -> None:
    """Run uvicorn on an already bound socket (closed when the server stops)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
