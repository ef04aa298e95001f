"""Whether the database answers, from the engine's own events, logged once per change of state.

During an outage every request that needs the database fails the same way; one line when it goes
away and one when it is back tell the operator more than a traceback per request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

log = logging.getLogger(__name__)

# What a request sees while the database cannot be reached: refused or dropped connections, a
# server shutting down, a pool whose connections are all stuck. Answered 503, never 500.
UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeoutError)
# SQLSTATEs of a transaction that lost a race with another (a deadlock, a serialisation failure, a
# lock held by another past lock_timeout): raised as an OperationalError too, but the database is
# fine and the request can be sent again.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
# SQLite's own (and their extended codes): the file's write lock still held by another connection
# after the busy timeout.
SQLITE_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")


def is_conflict(exc: BaseException | None) -> bool:
    """Whether ``exc`` (a SQLAlchemy error) is a transaction rolled back for a concurrent one."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in CONFLICT_SQLSTATES:
        return True
    return str(getattr(orig, "sqlite_errorname", "")).startswith(SQLITE_BUSY)


def summary(exc: BaseException) -> str:
    """The error's class and first line, without the driver's connection details."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class DatabaseHealth:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_error = ""

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._last_error = summary(exc)
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.error(
                    "database unreachable (%s); requests that need it answer 503 database_unavailable, "
                    "identify answers from memory without names",
                    self._last_error,
                )

    def succeeded(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is not None:
                log.warning(
                    "database reachable again after %.1f s (last error: %s)",
                    time.monotonic() - self._down_since,
                    self._last_error,
                )
                self._down_since = None

    def watch(self, engine: Engine) -> None:
        """Follow ``engine``: a connection checked out means up, a connection error means down."""

        def on_connect(connection: Any) -> None:
            self.succeeded()

        def on_error(context: ExceptionContext) -> None:
            error = context.sqlalchemy_exception
            if is_conflict(error):
                return
            if context.is_disconnect or isinstance(error, UNAVAILABLE):
                self.failed(error if error is not None else context.original_exception)

        event.listen(engine, "engine_connect", on_connect)
        event.listen(engine, "handle_error", on_error)
