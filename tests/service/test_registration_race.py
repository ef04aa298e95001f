"""Two processes creating the same row at once (replicas on one database): a species and a model
version (replicas starting on a fresh database, or every replica's model watcher reloading a new
artifact), an animal enrolled under the same external id on two replicas. The second gets the
first's row instead of a unique-key error."""

from __future__ import annotations

import threading
import time

import httpx
from apps import AppRunner
from imagegen import jpeg
from sqlalchemy.orm import Session

from service.db.repository import Repository
from service.db.session import make_engine, make_sessionmaker
from service.runtime import Runtime
from service.settings import Settings


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


def test_an_enroll_racing_another_process_creating_the_individual_joins_it(
    backend: str, settings: Settings, runner: AppRunner
) -> None:
    """Another replica creates the same new animal (same external id) while this one enrolls it: the
    enroll waits on the unique key, then adds its photo to the other's animal instead of failing."""
    client = runner.start(settings)
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with runtime.sessions() as other:
        repo = Repository(other)
        species = repo.species_by_name("dog")
        assert species is not None
        theirs = repo.create_individual(species.id, "race-1", None, None)  # not committed yet
        answers: list[httpx.Response] = []
        enroll = threading.Thread(
            target=lambda: answers.append(
                client.post(
                    "/enroll",
                    data={"species": "dog", "external_id": "race-1"},
                    files=[("images", ("a.jpg", jpeg(860, 0), "image/jpeg"))],
                )
            )
        )
        enroll.start()
        time.sleep(1.0)
        other.commit()
    enroll.join(60)
    (answer,) = answers
    assert answer.status_code == 201, answer.text
    assert answer.json()["individual"]["id"] == str(theirs.id)
    assert client.get(f"/individuals/{theirs.id}").json()["image_count"] == 1
