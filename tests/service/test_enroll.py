"""POST /enroll: multipart and base64 JSON, idempotent re-sends, and every refusal."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import faiss
import pytest
import torch
from apps import ADMIN, READ, make_settings
from fastapi.testclient import TestClient
from imagegen import encode, jpeg, photo

from service.app import create_app
from service.db.repository import Repository
from training.artifact import export_artifact, load_artifact


def new_id() -> str:
    return f"ext-{uuid.uuid4().hex[:12]}"


def multipart(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"photo{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def enroll(client: TestClient, ext: str, *images: bytes, species: str = "dog", **fields: str):  # noqa: ANN201
    return client.post(
        "/enroll", data={"species": species, "external_id": ext, **fields}, files=multipart(*images)
    )


def index_size(client: TestClient, species: str = "dog") -> int:
    return client.app.state.runtime.registry.serving(species).gallery.__len__()


def test_multipart_enroll_creates_the_individual_and_it_is_identifiable_at_once(
    shared_client: TestClient,
) -> None:
    ext = new_id()
    before = index_size(shared_client)
    response = shared_client.post(
        "/enroll",
        data={
            "species": "dog",
            "external_id": ext,
            "name": "Rex",
            "metadata": json.dumps({"breed": "beagle"}),
        },
        files=multipart(jpeg(101, 0), jpeg(101, 1)),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["individual_created"] is True
    assert body["individual"]["external_id"] == ext
    assert body["individual"]["name"] == "Rex"
    assert body["individual"]["metadata"] == {"breed": "beagle"}
    assert body["individual"]["image_count"] == 2
    assert [image["created"] for image in body["images"]] == [True, True]
    assert body["model_version"].startswith("dog-")
    assert index_size(shared_client) == before + 2

    found = shared_client.post("/identify", data={"species": "dog"}, files={"image": ("q.jpg", jpeg(101, 2))})
    assert found.status_code == 200
    assert found.json()["decision"] == "match"
    assert found.json()["best"]["individual_id"] == body["individual"]["id"]


def test_base64_json_enroll_accepts_plain_base64_and_data_urls(shared_client: TestClient) -> None:
    ext = new_id()
    plain = base64.b64encode(jpeg(102, 0)).decode()
    data_url = "data:image/png;base64," + base64.b64encode(encode(photo(102, 1), "PNG")).decode()
    response = shared_client.post(
        "/enroll", json={"species": "dog", "external_id": ext, "images": [plain, data_url]}
    )
    assert response.status_code == 201, response.text
    assert response.json()["individual"]["image_count"] == 2


def test_resending_the_same_image_is_idempotent(shared_client: TestClient) -> None:
    ext = new_id()
    first = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": ext}, files=multipart(jpeg(103))
    )
    assert first.status_code == 201
    size = index_size(shared_client)
    again = enroll(shared_client, ext, jpeg(103), jpeg(103))
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["individual_created"] is False
    assert body["individual"]["id"] == first.json()["individual"]["id"]
    assert len(body["images"]) == 1  # the duplicate inside the request counts once
    assert body["images"][0]["created"] is False
    assert body["images"][0]["image_id"] == first.json()["images"][0]["image_id"]
    assert body["individual"]["image_count"] == 1
    assert index_size(shared_client) == size


def test_enroll_into_an_existing_individual_by_id(shared_client: TestClient) -> None:
    created = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": new_id()}, files=multipart(jpeg(104, 0))
    ).json()
    individual_id = created["individual"]["id"]
    more = shared_client.post(
        "/enroll", data={"species": "dog", "individual_id": individual_id}, files=multipart(jpeg(104, 1))
    )
    assert more.status_code == 201
    assert more.json()["individual_created"] is False
    assert more.json()["individual"]["image_count"] == 2


def test_enroll_keeps_the_original_bytes_and_writes_the_audit_log(shared_client: TestClient) -> None:
    original = jpeg(105, 3)
    body = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": new_id()}, files=multipart(original)
    ).json()
    individual_id, image_id = body["individual"]["id"], body["images"][0]["image_id"]
    stored = shared_client.get(f"/individuals/{individual_id}/images/{image_id}/file", headers=READ)
    assert stored.status_code == 200
    assert stored.content == original
    assert stored.headers["content-type"] == "image/jpeg"
    with shared_client.app.state.runtime.sessions() as session:
        entries = Repository(session).audit_entries(uuid.UUID(individual_id))
    assert [entry.action for entry in entries] == ["enroll"]
    assert entries[0].details["images"] == [image_id]
    assert (
        entries[0].actor != "auth-disabled" and len(entries[0].actor) == 12
    )  # a key fingerprint, not the key


def test_one_bad_image_rejects_the_whole_request_and_stores_nothing(shared_client: TestClient) -> None:
    ext = new_id()
    size = index_size(shared_client)
    response = shared_client.post(
        "/enroll",
        data={"species": "dog", "external_id": ext},
        files=multipart(jpeg(106), b"GIF89a not allowed"),
    )
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"
    assert response.json()["details"]["field"] == "images[1]"
    listed = shared_client.get("/individuals", params={"external_id": ext}, headers=READ).json()
    assert listed["count"] == 0
    assert index_size(shared_client) == size


def error_code(response) -> tuple[int, str]:  # noqa: ANN001
    return response.status_code, response.json()["code"]


def test_enroll_refusals_have_stable_codes(shared_client: TestClient) -> None:
    img = multipart(jpeg(107))
    cat = shared_client.post("/enroll", data={"species": "cat", "external_id": new_id()}, files=img).json()
    cases = [
        ({"species": "wolf", "external_id": "x"}, img, (404, "species_not_found")),
        ({"species": "dog", "individual_id": str(uuid.uuid4())}, img, (404, "individual_not_found")),
        ({"species": "dog", "individual_id": cat["individual"]["id"]}, img, (409, "species_mismatch")),
        ({"species": "dog"}, img, (422, "invalid_request")),
        ({"species": "dog", "external_id": "x", "metadata": "{not json"}, img, (422, "invalid_request")),
        ({"species": "dog", "external_id": "x", "colour": "red"}, img, (422, "validation_error")),
        ({"species": "Dog Breed!", "external_id": "x"}, img, (422, "validation_error")),
    ]
    for data, files, expected in cases:
        response = shared_client.post("/enroll", data=data, files=files)
        assert error_code(response) == expected, (data, response.text)
    wrong_field = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": "x"}, files={"image": b"x"}
    )
    assert error_code(wrong_field) == (422, "invalid_request")


def test_a_form_without_files_is_refused(shared_client: TestClient) -> None:
    boundary = "animalid-test-boundary"
    parts = [("species", "dog"), ("external_id", "x")]
    body = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in parts
    )
    response = shared_client.post(
        "/enroll",
        content=(body + f"--{boundary}--\r\n").encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert error_code(response) == (422, "invalid_request")
    assert "images" in response.json()["message"]


def test_json_enroll_refusals(shared_client: TestClient) -> None:
    bad_b64 = shared_client.post("/enroll", json={"species": "dog", "external_id": "x", "images": ["***"]})
    assert error_code(bad_b64) == (422, "invalid_base64")
    empty = shared_client.post("/enroll", json={"species": "dog", "external_id": "x", "images": []})
    assert error_code(empty) == (422, "validation_error")
    not_json = shared_client.post("/enroll", content=b"{", headers={"content-type": "application/json"})
    assert error_code(not_json) == (400, "malformed_body")
    text = shared_client.post("/enroll", content=b"hello", headers={"content-type": "text/plain"})
    assert error_code(text) == (415, "unsupported_media_type")
    array = shared_client.post("/enroll", json=[1, 2])
    assert error_code(array) == (422, "invalid_request")


def send_enroll(client: TestClient, form: str, fields: dict[str, Any], seed: int):  # noqa: ANN201
    """``fields`` as JSON (``json.dumps`` writes NaN and Infinity, as some clients do) or as a form."""
    image = jpeg(seed)
    if form == "json":
        body = {"species": "dog", **fields, "images": [base64.b64encode(image).decode()]}
        return client.post(
            "/enroll", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
    data = {key: json.dumps(value) if key == "metadata" else value for key, value in fields.items()}
    return client.post("/enroll", data={"species": "dog", **data}, files=multipart(image))


UNSTORABLE = [
    pytest.param({"external_id": "a\x00b"}, "control_character", id="nul-external-id"),
    pytest.param({"external_id": "a\nb"}, "control_character", id="newline-external-id"),
    pytest.param({"name": "Re\x00x"}, "control_character", id="nul-name"),
    pytest.param({"metadata": {"note": "a\x00b"}}, "control_character", id="nul-in-metadata"),
    pytest.param({"metadata": {"a\x00": 1}}, "control_character", id="nul-metadata-key"),
    pytest.param({"metadata": {"note": "a\ud800"}}, "string_unicode", id="surrogate-in-metadata"),
    pytest.param({"metadata": {"x": float("nan")}}, "non_finite_number", id="nan-metadata"),
    pytest.param({"metadata": {"x": [1, {"y": float("-inf")}]}}, "non_finite_number", id="nested-inf"),
]
# A lone surrogate cannot go into a multipart body at all (it has no UTF-8 encoding); JSON escapes
# it, and the database driver could not encode it either.
UNSTORABLE_JSON_ONLY = [
    pytest.param({"name": "Re\ud800x"}, "string_unicode", id="surrogate-in-name"),
    pytest.param({"external_id": "a\udfffb"}, "string_unicode", id="surrogate-in-external-id"),
]
UNSTORABLE_CASES = [
    pytest.param(form, *case.values, id=f"{case.id}-{form}")
    for case in UNSTORABLE
    for form in ("json", "multipart")
] + [pytest.param("json", *case.values, id=f"{case.id}-json") for case in UNSTORABLE_JSON_ONLY]


@pytest.mark.parametrize("form,fields,error_type", UNSTORABLE_CASES)
def test_values_the_database_cannot_store_are_refused_and_nothing_is_stored(
    shared_client: TestClient, form: str, fields: dict[str, Any], error_type: str
) -> None:
    """Postgres refuses NUL in text and NaN or NUL in JSONB (SQLite turned NaN into null): 422, not 500."""
    fields = {"external_id": new_id(), **fields}
    size = index_size(shared_client)
    before = shared_client.get("/individuals", headers=READ).json()["count"]
    response = send_enroll(shared_client, form, fields, seed=110)
    assert error_code(response) == (422, "validation_error"), response.text
    assert [error["type"] for error in response.json()["details"]["errors"]] == [error_type]
    assert shared_client.get("/individuals", headers=READ).json()["count"] == before
    assert index_size(shared_client) == size


@pytest.mark.parametrize("extra", [1, 3])
def test_too_many_images_get_one_answer_as_multipart_and_as_json(
    shared_client: TestClient, extra: int
) -> None:
    """The same rule broken the same way: multipart (Starlette's file limit) and JSON (the service)."""
    limit = shared_client.app.state.settings.max_images_per_request
    images = [jpeg(108, i) for i in range(limit + extra)]
    before = shared_client.get("/individuals", headers=READ).json()["count"]
    as_form = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": new_id()}, files=multipart(*images)
    )
    as_json = shared_client.post(
        "/enroll",
        json={
            "species": "dog",
            "external_id": new_id(),
            "images": [base64.b64encode(image).decode() for image in images],
        },
    )
    assert error_code(as_form) == (422, "invalid_request"), as_form.text
    assert error_code(as_json) == (422, "invalid_request"), as_json.text
    assert str(limit) in as_form.json()["message"] and str(limit) in as_json.json()["message"]
    assert shared_client.get("/individuals", headers=READ).json()["count"] == before


def test_external_id_is_unique_within_a_species_only(shared_client: TestClient) -> None:
    ext = new_id()
    dog = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": ext}, files=multipart(jpeg(109))
    )
    cat = shared_client.post(
        "/enroll", data={"species": "cat", "external_id": ext}, files=multipart(jpeg(109))
    )
    assert dog.status_code == cat.status_code == 201
    assert dog.json()["individual"]["id"] != cat.json()["individual"]["id"]
    again = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": ext}, files=multipart(jpeg(109, 1))
    )
    assert again.json()["individual"]["id"] == dog.json()["individual"]["id"]
    conflict = shared_client.post(
        "/enroll",
        data={"species": "dog", "external_id": new_id(), "individual_id": dog.json()["individual"]["id"]},
        files=multipart(jpeg(109, 2)),
    )
    assert error_code(conflict) == (409, "external_id_conflict")


def test_an_embedding_the_index_would_refuse_is_refused_before_anything_is_stored(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    broken = load_artifact(artifacts["dog"])
    torch.nn.init.zeros_(broken.model.neck[-1].weight)  # every embedding is the zero vector
    torch.nn.init.zeros_(broken.model.neck[-1].bias)
    models = tmp_path / "models"
    export_artifact(broken.model, broken.card, models / "dog")
    with TestClient(create_app(make_settings(database_url, tmp_path, models)), headers=ADMIN) as client:
        response = enroll(client, new_id(), jpeg(111))
        assert error_code(response) == (422, "image_rejected"), response.text
        assert "zero" in response.json()["message"]
        assert client.get("/individuals", headers=READ).json()["count"] == 0
        dog = next(item for item in client.get("/status").json()["species"] if item["name"] == "dog")
        assert (dog["consistent"], dog["index_size"], dog["database_images"]) == (True, 0, 0)


def test_an_index_add_failing_after_the_commit_is_a_503_and_the_retry_indexes(
    shared_client: TestClient,
) -> None:
    gallery = shared_client.app.state.runtime.registry.serving("dog").gallery
    index = gallery._index
    assert index._gpu is None  # no GPU here: stand in a mirror that refuses every add (GPU out of memory)
    index._gpu = faiss.IndexFlatIP(index.dim + 1)
    ext, size = new_id(), index_size(shared_client)
    try:
        failed = enroll(shared_client, ext, jpeg(113))
    finally:
        index._gpu = None
    assert error_code(failed) == (503, "index_update_failed"), failed.text
    assert "send the same request again" in failed.json()["message"]
    stored = shared_client.get("/individuals", params={"external_id": ext}, headers=READ).json()
    assert stored["count"] == 1 and stored["data"][0]["id"] == failed.json()["details"]["individual_id"]
    # On Postgres the process's index follower may already have added it from the change log.
    assert index_size(shared_client) in (size, size + 1)
    retry = enroll(shared_client, ext, jpeg(113))
    assert retry.status_code == 200 and retry.json()["images"][0]["created"] is False
    assert index_size(shared_client) == size + 1


def test_resending_images_indexes_their_stored_vectors_the_index_lacks(shared_client: TestClient) -> None:
    ext = new_id()
    first = enroll(shared_client, ext, jpeg(112, 0), jpeg(112, 1)).json()
    image_ids = [uuid.UUID(image["image_id"]) for image in first["images"]]
    with shared_client.app.state.runtime.sessions() as session:
        dog = Repository(session).species_by_name("dog")
        assert dog is not None
        version = Repository(session).active_version(dog.id)
        assert version is not None
        embedding_ids = Repository(session).embedding_ids(image_ids, version.id)
    gallery = shared_client.app.state.runtime.registry.serving("dog").gallery
    lost = embedding_ids[image_ids[0]]
    gallery.remove([lost])  # as when the index add failed after the commit and the client got a 500

    again = enroll(shared_client, ext, jpeg(112, 0), jpeg(112, 1))
    assert again.status_code == 200, again.text
    assert [image["created"] for image in again.json()["images"]] == [False, False]
    assert lost in gallery
    found = shared_client.post(
        "/identify", data={"species": "dog"}, files={"image": jpeg(112, 0)}, headers=READ
    )
    assert found.json()["best"]["image_id"] == str(image_ids[0])
    assert all(
        item["consistent"] for item in shared_client.get("/status").json()["species"] if item["index_size"]
    )
