"""Work that one process of several on a database does at a time: a Postgres advisory lock.

An API process's own locks (a species' write lock) do not reach the other replicas on the same
database. Where the work must still happen once, it takes a claim: a session-level advisory lock
on a connection of its own, held for as long as the work runs. Postgres releases it when that
connection ends, so a process that dies mid-work hands it to the next one that asks.

- A re-embedding of a new model version (``reembedding``): each replica's model watcher reloads
  the same new artifact within seconds; one re-embeds, the others wait and swap to it.
- The resolution of a review item (``review``): two admins resolving one kept photo through two
  replicas; the second is refused while the first runs.

SQLite serves one process: a claim is always granted there (the process's own locks suffice).
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

LOCK_SPACE = "animalid:"
"""Prefix of the first key of the two-key advisory lock, which hashes it with the claim's kind and
the schema (two deployments can share a database, and its advisory locks, in two schemas); the
second key hashes the claimed thing's id."""


class Claim:
    """The right to do ``kind`` work on ``key`` (a model version's id, a review item's), held until
    :meth:`release`."""

    def __init__(self, engine: Engine, kind: str, key: object) -> None:
        self._engine = engine
        self._space = f"{LOCK_SPACE}{kind}:"
        self._key = str(key)
        self._connection: Connection | None = None
        self.held = False

    def try_take(self) -> bool:
        """Take the claim if no other process holds it; True once held."""
        if self.held:
            return True
        if self._engine.dialect.name != "postgresql":
            self.held = True
            return True
        if self._connection is None:
            self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.held = bool(self._call(self._connection, "pg_try_advisory_lock"))
        return self.held

    def release(self) -> None:
        """Let the claim go (and its connection back to the pool; closed if the unlock fails)."""
        connection, self._connection = self._connection, None
        if connection is None:
            self.held = False
            return
        try:
            if self.held:
                self._call(connection, "pg_advisory_unlock")
        except SQLAlchemyError:
            log.warning("cannot unlock the claim on %s%s; closing its connection", self._space, self._key)
            connection.invalidate()  # the server ends the session, and the lock with it
        finally:
            self.held = False
            connection.close()

    def _call(self, connection: Connection, function: str) -> object:
        """``function(space, key)``, one of Postgres's two-key advisory lock functions."""
        statement = text(f"SELECT {function}(hashtext(:space || current_schema()), hashtext(:key))")
        return connection.execute(statement, {"space": self._space, "key": self._key}).scalar()
