"""Two processes registering the same species and model version at once (replicas starting on a
fresh database, or every replica's model watcher reloading a new artifact): the second gets the
first's rows instead of a unique-key error."""

from __future__ import annotations

import threading
import time

from sqlalchemy.orm import Session

from service.db.repository import Repository
from service.db.session import make_engine, make_sessionmaker


def register(session: Session) -> tuple[int, int]:
    repo = Repository(session)
    species = repo.ensure_species("okapi")
    version = repo.ensure_model_version(species.id, "okapi-1", 8, "v1", 0.5, {"species": "okapi"})
    return species.id, version.id


def test_a_registration_racing_another_gets_its_rows(database_url: str) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        mine = register(first)  # inserted, not committed: the other insert waits on the unique keys
        theirs: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with sessions() as second:
                    theirs.append(register(second))
                    second.commit()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)
        first.commit()
        first.close()
        thread.join(30)
        assert not errors, errors
        assert theirs == [mine]
    finally:
        engine.dispose()
