"""/individuals: list, get, update, delete (vectors too), merge; list, download and delete images."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from apps import ADMIN, READ, make_settings
from fastapi.testclient import TestClient
from imagegen import jpeg
from sqlalchemy import event
from sqlalchemy.orm import Session

from service.api.deps import SessionDep
from service.app import create_app
from service.db.repository import Repository


def enroll(
    client: TestClient, individual: int, shots: range = range(2), species: str = "dog", **fields: str
) -> dict:
    files = [("images", (f"{s}.jpg", jpeg(individual, s), "image/jpeg")) for s in shots]
    data = {"species": species, "external_id": f"e{individual}-{uuid.uuid4().hex[:8]}", **fields}
    response = client.post("/enroll", data=data, files=files)
    assert response.status_code == 201, response.text
    return response.json()


def best_match(client: TestClient, image: bytes) -> str | None:
    body = client.post("/identify", data={"species": "dog"}, files={"image": image}, headers=READ).json()
    return body["best"]["individual_id"] if body["best"] else None


def dog_index(client: TestClient) -> int:
    return len(client.app.state.runtime.registry.serving("dog").gallery)


def test_list_paginates_and_filters(client: TestClient) -> None:
    made = [enroll(client, 400 + i, range(1), species="dog" if i < 5 else "cat") for i in range(7)]
    everything = client.get("/individuals", headers=READ).json()
    assert everything["count"] == 7 and len(everything["data"]) == 7
    page = client.get("/individuals", params={"species": "dog", "offset": 1, "limit": 2}, headers=READ).json()
    assert page["count"] == 5 and (page["offset"], page["limit"]) == (1, 2)
    assert [item["id"] for item in page["data"]] == [m["individual"]["id"] for m in made[1:3]]
    last = client.get("/individuals", params={"species": "dog", "offset": 4, "limit": 2}, headers=READ).json()
    assert len(last["data"]) == 1
    ext = made[6]["individual"]["external_id"]
    one = client.get("/individuals", params={"external_id": ext}, headers=READ).json()
    assert one["count"] == 1 and one["data"][0]["species"] == "cat" and one["data"][0]["image_count"] == 1
    unknown = client.get("/individuals", params={"species": "wolf"}, headers=READ)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "species_not_found")
    too_big = client.get("/individuals", params={"limit": 10_000}, headers=READ)
    assert (too_big.status_code, too_big.json()["code"]) == (422, "validation_error")


def test_get_and_update(shared_client: TestClient) -> None:
    made = enroll(shared_client, 410, name="Rex")
    individual_id = made["individual"]["id"]
    got = shared_client.get(f"/individuals/{individual_id}", headers=READ).json()
    assert got == made["individual"]
    renamed = shared_client.patch(f"/individuals/{individual_id}", json={"name": "Max"})
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "Max" and renamed.json()["metadata"] == {}
    meta = shared_client.patch(
        f"/individuals/{individual_id}", json={"metadata": {"farm": "north", "age": 3}}
    )
    assert meta.json()["name"] == "Max" and meta.json()["metadata"] == {"farm": "north", "age": 3}
    assert meta.json()["updated_at"] >= got["updated_at"]
    cleared = shared_client.patch(f"/individuals/{individual_id}", json={"name": None})
    assert cleared.json()["name"] is None and cleared.json()["metadata"] == {"farm": "north", "age": 3}
    for body, status, code in [({}, 422, "invalid_request"), ({"colour": "red"}, 422, "validation_error")]:
        response = shared_client.patch(f"/individuals/{individual_id}", json=body)
        assert (response.status_code, response.json()["code"]) == (status, code)
    missing = shared_client.patch(f"/individuals/{uuid.uuid4()}", json={"name": "x"})
    assert (missing.status_code, missing.json()["code"]) == (404, "individual_not_found")
    bad_id = shared_client.get("/individuals/not-a-uuid", headers=READ)
    assert (bad_id.status_code, bad_id.json()["code"]) == (422, "validation_error")


@pytest.mark.parametrize(
    "body,error_type",
    [
        ('{"name": "Re\\u0000x"}', "control_character"),
        ('{"name": "Rex\\r\\n"}', "control_character"),
        ('{"name": "Re\\ud800x"}', "string_unicode"),
        ('{"metadata": {"x": NaN}}', "non_finite_number"),
        ('{"metadata": {"x": {"y": [Infinity]}}}', "non_finite_number"),
        ('{"metadata": {"note": "a\\u0000b"}}', "control_character"),
        ('{"metadata": {"\\u0000": 1}}', "control_character"),
    ],
)
def test_update_refuses_values_the_database_cannot_store(
    shared_client: TestClient, body: str, error_type: str
) -> None:
    """Postgres refuses NUL in text and NaN or NUL in JSONB (a 500 before); nothing changes."""
    made = enroll(shared_client, 415, range(1), name="Rex", metadata='{"breed": "beagle"}')
    individual_id = made["individual"]["id"]
    response = shared_client.patch(
        f"/individuals/{individual_id}", content=body, headers={"content-type": "application/json"}
    )
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert [error["type"] for error in response.json()["details"]["errors"]] == [error_type]
    assert shared_client.get(f"/individuals/{individual_id}", headers=READ).json() == made["individual"]
    with shared_client.app.state.runtime.sessions() as session:
        actions = [e.action for e in Repository(session).audit_entries(uuid.UUID(individual_id))]
    assert actions == ["enroll"]


def test_update_keeps_line_breaks_and_finite_numbers_in_metadata(shared_client: TestClient) -> None:
    individual_id = enroll(shared_client, 416, range(1))["individual"]["id"]
    metadata = {"note": "line one\nline two\ttab", "weight": 1.5e300, "tags": ["a", None]}
    response = shared_client.patch(f"/individuals/{individual_id}", json={"metadata": metadata})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == metadata


@pytest.mark.parametrize("external_id", ["\x00", "a\x00b", "a\nb"])
def test_list_refuses_control_characters_in_the_external_id_filter(
    shared_client: TestClient, external_id: str
) -> None:
    response = shared_client.get("/individuals", params={"external_id": external_id}, headers=READ)
    assert (response.status_code, response.json()["code"]) == (422, "validation_error"), response.text
    assert [error["type"] for error in response.json()["details"]["errors"]] == ["control_character"]


def test_a_value_postgres_refuses_past_the_schemas_is_a_422_and_nothing_changes(
    database_factory: Callable[[str], str], service_root: Path
) -> None:
    """The safety net behind the schemas: a DataError from the database is a JSON 422, not a 500."""
    app = create_app(make_settings(database_factory("postgres"), service_root, service_root / "models"))

    @app.patch("/raw-rename/{individual_id}")
    def raw_rename(session: SessionDep, individual_id: uuid.UUID, name: str) -> None:
        individual = Repository(session).get_individual(individual_id)
        assert individual is not None
        individual.name = name
        session.commit()

    with TestClient(app, headers=ADMIN) as client:
        made = enroll(client, 417, range(1), name="Rex")["individual"]
        response = client.patch(f"/raw-rename/{made['id']}", params={"name": "a\x00b"})
        assert (response.status_code, response.json()["code"]) == (422, "unstorable_value"), response.text
        assert client.get(f"/individuals/{made['id']}", headers=READ).json() == made


@pytest.mark.parametrize("name", ["Max", "Rex"], ids=["new-name", "unchanged-name"])
def test_an_update_racing_a_delete_answers_404_and_audits_nothing(client: TestClient, name: str) -> None:
    """An unchanged value sends no UPDATE, so no stale-row error tells the update that the row went."""
    individual_id = enroll(client, 415, name="Rex")["individual"]["id"]
    sessions = client.app.state.runtime.sessions
    deleted: list[int] = []
    fired = threading.Event()

    def delete_first(session: Session, *_: object) -> None:
        if not fired.is_set():  # the PATCH has read the row and is about to write it
            fired.set()  # before the DELETE, whose own flush comes through here too
            deleted.append(client.delete(f"/individuals/{individual_id}").status_code)

    event.listen(sessions, "before_flush", delete_first)
    try:
        response = client.patch(f"/individuals/{individual_id}", json={"name": name})
    finally:
        event.remove(sessions, "before_flush", delete_first)
    assert deleted == [200]
    assert (response.status_code, response.json()["code"]) == (404, "individual_not_found"), response.text
    with client.app.state.runtime.sessions() as session:
        actions = [e.action for e in Repository(session).audit_entries(uuid.UUID(individual_id))]
    assert actions == ["enroll", "delete_individual"]


def test_delete_drops_rows_vectors_and_files(shared_client: TestClient) -> None:
    made = enroll(shared_client, 420, range(3))
    individual_id = made["individual"]["id"]
    store = shared_client.app.state.runtime.store
    with shared_client.app.state.runtime.sessions() as session:
        paths = [
            store.absolute(i.storage_path) for i in Repository(session).images_of(uuid.UUID(individual_id))
        ]
    assert all(path.is_file() for path in paths)
    assert best_match(shared_client, jpeg(420, 9)) == individual_id
    size = dog_index(shared_client)

    response = shared_client.delete(f"/individuals/{individual_id}")
    assert response.status_code == 200
    assert response.json() == {"id": individual_id, "deleted_images": 3}
    assert dog_index(shared_client) == size - 3
    assert best_match(shared_client, jpeg(420, 9)) != individual_id
    assert not any(path.exists() for path in paths)
    gone = shared_client.get(f"/individuals/{individual_id}", headers=READ)
    assert (gone.status_code, gone.json()["code"]) == (404, "individual_not_found")
    with shared_client.app.state.runtime.sessions() as session:
        actions = [e.action for e in Repository(session).audit_entries(uuid.UUID(individual_id))]
    assert actions == ["enroll", "delete_individual"]
    again = shared_client.delete(f"/individuals/{individual_id}")
    assert again.status_code == 404


def test_images_list_get_download_and_delete(shared_client: TestClient) -> None:
    made = enroll(shared_client, 430, range(3))
    individual_id = made["individual"]["id"]
    listed = shared_client.get(
        f"/individuals/{individual_id}/images", params={"limit": 2}, headers=READ
    ).json()
    assert listed["count"] == 3 and len(listed["data"]) == 2
    image = listed["data"][0]
    assert image["sha256"] == made["images"][0]["sha256"] and image["format"] == "JPEG"
    one = shared_client.get(f"/individuals/{individual_id}/images/{image['id']}", headers=READ)
    assert one.json() == image
    file = shared_client.get(f"/individuals/{individual_id}/images/{image['id']}/file", headers=READ)
    assert file.content == jpeg(430, 0)
    size = dog_index(shared_client)

    deleted = shared_client.delete(f"/individuals/{individual_id}/images/{image['id']}")
    assert deleted.status_code == 200 and deleted.json()["id"] == image["id"]
    assert dog_index(shared_client) == size - 1
    after = shared_client.get(f"/individuals/{individual_id}", headers=READ).json()
    assert after["image_count"] == 2
    # The deleted photo no longer matches itself exactly; the other two still identify the dog.
    body = shared_client.post(
        "/identify", data={"species": "dog"}, files={"image": jpeg(430, 0)}, headers=READ
    )
    assert body.json()["best"]["image_id"] != image["id"]

    other = enroll(shared_client, 431, range(1))["individual"]["id"]
    wrong_owner = shared_client.get(
        f"/individuals/{other}/images/{made['images'][1]['image_id']}", headers=READ
    )
    assert (wrong_owner.status_code, wrong_owner.json()["code"]) == (404, "image_not_found")
    twice = shared_client.delete(f"/individuals/{individual_id}/images/{image['id']}")
    assert (twice.status_code, twice.json()["code"]) == (404, "image_not_found")


def test_merge_moves_images_drops_duplicates_and_deletes_the_source(shared_client: TestClient) -> None:
    target = enroll(shared_client, 440, range(2), name="keeper")
    source = enroll(shared_client, 441, range(2), name="duplicate", metadata='{"tag": 1}')
    # The source also has one photo the target has: it is dropped, not duplicated.
    files = {"images": ("dup.jpg", jpeg(440, 0), "image/jpeg")}
    shared_client.post(
        "/enroll", data={"species": "dog", "individual_id": source["individual"]["id"]}, files=files
    )
    size = dog_index(shared_client)
    target_id, source_id = target["individual"]["id"], source["individual"]["id"]

    response = shared_client.post(f"/individuals/{target_id}/merge", json={"source_id": source_id})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["moved_images"], body["duplicate_images_dropped"]) == (2, 1)
    assert body["individual"]["image_count"] == 4 and body["individual"]["name"] == "keeper"
    assert dog_index(shared_client) == size - 1
    assert shared_client.get(f"/individuals/{source_id}", headers=READ).status_code == 404
    assert best_match(shared_client, jpeg(441, 5)) == target_id  # the source's photos now name the target
    with shared_client.app.state.runtime.sessions() as session:
        merge = Repository(session).audit_entries(uuid.UUID(target_id))[-1]
    assert merge.action == "merge"
    assert merge.details["source_id"] == source_id and merge.details["source_metadata"] == {"tag": 1}


def test_merge_refusals(shared_client: TestClient) -> None:
    dog = enroll(shared_client, 450, range(1))["individual"]["id"]
    cat = enroll(shared_client, 451, range(1), species="cat")["individual"]["id"]
    cases = [
        (dog, {"source_id": cat}, 409, "species_mismatch"),
        (dog, {"source_id": str(uuid.uuid4())}, 404, "individual_not_found"),
        (str(uuid.uuid4()), {"source_id": dog}, 404, "individual_not_found"),
        (dog, {}, 422, "validation_error"),
    ]
    for target, body, status, code in cases:
        response = shared_client.post(f"/individuals/{target}/merge", json=body)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert shared_client.get(f"/individuals/{dog}", headers=READ).json()["image_count"] == 1


@pytest.mark.parametrize(
    "method,path", [("get", "/individuals/{id}/images"), ("delete", "/individuals/{id}")]
)
def test_unknown_individual_everywhere(shared_client: TestClient, method: str, path: str) -> None:
    response = shared_client.request(method, path.format(id=uuid.uuid4()))
    assert (response.status_code, response.json()["code"]) == (404, "individual_not_found")
