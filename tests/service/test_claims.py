"""Claims: one process at a time per kind of work and key, Postgres-wide; always granted on SQLite
(one process)."""

from __future__ import annotations

from sqlalchemy import Engine, text

from service.db.claims import Claim
from service.db.session import make_engine


def test_one_holder_per_version_until_released_or_its_connection_ends(database_url: str) -> None:
    engines: list[Engine] = [make_engine(database_url), make_engine(database_url)]  # two processes
    try:
        first, second = Claim(engines[0], "reembedding", 7), Claim(engines[1], "reembedding", 7)
        other, review = Claim(engines[1], "reembedding", 8), Claim(engines[1], "review", 7)
        assert first.try_take() and first.try_take()  # taking it again is a no-op
        assert other.try_take() and review.try_take()  # another key, another kind: independent
        if engines[0].dialect.name == "sqlite":
            assert second.try_take()  # one process per SQLite database: nothing to exclude
            return
        assert not second.try_take() and not second.held
        first.release()
        assert not first.held and second.try_take()
        second.release()

        # The holder's session ends (its process died, say): Postgres drops the lock, the next one
        # takes over, and the first letting go of a claim it lost does not fail. The termination
        # waits (up to 5 s) for the backend to be gone: without a timeout it only signals it.
        assert first.try_take()
        with engines[1].connect() as connection:
            ended = connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted "
                    "AND classid = (hashtext('animalid:reembedding:' || current_schema())::bigint "
                    "& 4294967295)::oid AND objid = (hashtext('7')::bigint & 4294967295)::oid"
                )
            ).scalars()
            assert list(ended) == [True]
        assert second.try_take()
        first.release()
        assert not first.held
        second.release()
        other.release()
        review.release()
    finally:
        for engine in engines:
            engine.dispose()
