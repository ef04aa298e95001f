"""The re-embedding claim: one process at a time per model version, Postgres-wide; always granted
on SQLite (one process)."""

from __future__ import annotations

from sqlalchemy import Engine, text

from service.db.claims import ReembedClaim
from service.db.session import make_engine


def test_one_holder_per_version_until_released_or_its_connection_ends(database_url: str) -> None:
    engines: list[Engine] = [make_engine(database_url), make_engine(database_url)]  # two processes
    try:
        first, second = ReembedClaim(engines[0], 7), ReembedClaim(engines[1], 7)
        other = ReembedClaim(engines[1], 8)
        assert first.try_take() and first.try_take()  # taking it again is a no-op
        assert other.try_take()  # another version: independent
        if engines[0].dialect.name == "sqlite":
            assert second.try_take()  # one process per SQLite database: nothing to exclude
            return
        assert not second.try_take() and not second.held
        first.release()
        assert not first.held and second.try_take()
        second.release()

        # The holder's session ends (its process died, say): Postgres drops the lock, the next one
        # takes over, and the first letting go of a claim it lost does not fail.
        assert first.try_take()
        with engines[1].connect() as connection:
            ended = connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND objid = 7 AND granted"
                )
            ).scalars()
            assert list(ended) == [True]
        assert second.try_take()
        first.release()
        assert not first.held
        second.release()
        other.release()
    finally:
        for engine in engines:
            engine.dispose()
