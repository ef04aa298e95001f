"""API keys: parsed from settings, kept only as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    READ = "read"  # identify, verify, explain, list
    ADMIN = "admin"  # enroll, update, delete, merge (and everything read allows)

    def allows(self, needed: Scope) -> bool:
        return self is Scope.ADMIN or needed is Scope.READ


class KeyringError(ValueError):
    """The API key setting is malformed."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: the scope granted and a non-secret key fingerprint for the audit log."""

    scope: Scope
    fingerprint: str


ANONYMOUS_ADMIN = Principal(scope=Scope.ADMIN, fingerprint="auth-disabled")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeyring:
    entries: tuple[tuple[bytes, Scope], ...]

    @classmethod
    def parse(cls, spec: str) -> ApiKeyring:
        """``"readkey:read,adminkey:admin"`` -> digests with scopes. Keys must be unique."""
        entries: list[tuple[bytes, Scope]] = []
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                continue
            key, sep, scope = item.rpartition(":")
            if not sep or not key:
                raise KeyringError("each API key must look like KEY:read or KEY:admin")
            try:
                parsed = Scope(scope.strip().lower())
            except ValueError:
                raise KeyringError(f"unknown API key scope {scope.strip()!r} (use read or admin)") from None
            if len(key) < 8:
                raise KeyringError("API keys must be at least 8 characters long")
            digest = _digest(key)
            if any(hmac.compare_digest(digest, other) for other, _ in entries):
                raise KeyringError("the same API key is listed twice")
            entries.append((digest, parsed))
        return cls(entries=tuple(entries))

    def __len__(self) -> int:
        return len(self.entries)

    def authenticate(self, presented: str) -> Principal | None:
        """The principal for a presented key, or None. Every stored digest is compared."""
        digest = _digest(presented)
        found: Scope | None = None
        for stored, scope in self.entries:
            if hmac.compare_digest(digest, stored):
                found = scope
        if found is None:
            return None
        return Principal(scope=found, fingerprint=digest.hex()[:12])


class FailureLimiter:
    """Failed key checks per client address in a sliding window; past the limit, the address waits.

    While an address is over the limit every request from it that needs a key is refused (429)
    without looking at the key, so guessing gets no answer at all. Thread-safe; remembers at most
    ``max_clients`` addresses (the stalest are forgotten first), so its memory is bounded too.
    """

    def __init__(
        self,
        limit: int,
        window_seconds: float,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def wait(self, client: str) -> int:
        """Seconds ``client`` must wait before its key is checked again; 0 when it need not."""
        with self._lock:
            now = self._clock()
            times = self._recent(client, now)
            if times is None or len(times) < self.limit:
                return 0
            return max(1, math.ceil(times[-self.limit] + self.window - now))

    def failed(self, client: str) -> bool:
        """Count one failure; True when it brings ``client`` to the limit."""
        with self._lock:
            now = self._clock()
            times = self._recent(client, now)
            if times is None:
                times = self._failures[client] = deque()
            times.append(now)
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
            return len(times) == self.limit
