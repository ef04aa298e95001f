"""Work that one process of several on a database does at a time: a Postgres advisory lock.

A re-embedding of a new model version must run once, however many API processes reload it (each
replica's model watcher sees the same new artifact within seconds). The job holds a session-level
advisory lock keyed by the version on a connection of its own for as long as it runs; Postgres
releases it when that connection ends, so a process that dies mid-job hands the work to the next
one waiting, which resumes from the batches already committed. SQLite serves one process: the
claim is always granted.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

LOCK_SPACE = "animalid-reembed:"
"""The first key of the two-key advisory lock hashes this and the schema (two deployments can share
a database, and its advisory locks, in two schemas); the second is the model version's id."""


class ReembedClaim:
    """The right to re-embed one model version, held until :meth:`release`."""

    def __init__(self, engine: Engine, model_version_id: int) -> None:
        self._engine = engine
        self._key = model_version_id
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
        """Let the claim go (and its connection back to the pool; dropped if the unlock fails)."""
        connection, self._connection = self._connection, None
        if connection is None:
            self.held = False
            return
        try:
            if self.held:
                self._call(connection, "pg_advisory_unlock")
        except SQLAlchemyError:
            log.warning("cannot unlock the re-embedding claim of version %d; closing it", self._key)
            connection.invalidate()  # the server ends the session, and the lock with it
        finally:
            self.held = False
            connection.close()

    def _call(self, connection: Connection, function: str) -> object:
        """``function(space, key)``, one of Postgres's two-key advisory lock functions."""
        statement = text(f"SELECT {function}(hashtext(:space || current_schema()), :key)")
        return connection.execute(statement, {"space": LOCK_SPACE, "key": self._key}).scalar()
