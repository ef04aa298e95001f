"""Hardening: deeply nested JSON, the pixel budget, the image-quality gate, what open probes say,
the audit log and failed-key limits, and schema/behaviour agreement (issue 15, items 1, 3-6, 8).
The decoder's own memory bounds are in test_decode_memory.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from apps import ADMIN, ADMIN_KEY, READ, TestClient, make_models_dir, make_settings
from imagegen import encode, jpeg, photo
from PIL import Image

from service.app import create_app

DEEP = "[" * 100_000


def error(response) -> tuple[int, str]:  # noqa: ANN001
    return response.status_code, response.json()["code"]


def enroll(client: TestClient, external_id: str, *images: bytes, **fields: str):  # noqa: ANN201
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return client.post("/enroll", data={"species": "dog", "external_id": external_id, **fields}, files=files)


# 1. Deeply nested JSON -----------------------------------------------------------------------------


def test_deeply_nested_json_is_a_malformed_body_everywhere(shared_client: TestClient) -> None:
    made = enroll(shared_client, "deep-json", jpeg(900)).json()["individual"]["id"]
    raw = {"content": DEEP, "headers": {"content-type": "application/json"}}
    for path in ("/identify", "/verify", "/explain"):
        answer = shared_client.post(path, content=DEEP, headers={**READ, "content-type": "application/json"})
        assert error(answer) == (400, "malformed_body")
    assert error(shared_client.post("/enroll", **raw)) == (400, "malformed_body")
    assert error(shared_client.patch(f"/individuals/{made}", **raw)) == (400, "malformed_body")
    assert error(shared_client.post(f"/individuals/{made}/merge", **raw)) == (400, "malformed_body")
    in_field = enroll(shared_client, "deep-json-field", jpeg(901), metadata=DEEP)
    assert error(in_field) == (400, "malformed_body")
    # Parseable but deeper than metadata may nest: refused by validation, not a 500 when answered.
    nested: dict = {}
    node = nested
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    too_deep = enroll(shared_client, "deep-json-ok", jpeg(902), metadata=json.dumps(nested))
    assert error(too_deep) == (422, "validation_error") and "too_deep" in too_deep.text
    assert shared_client.get("/health").status_code == 200


# 3. Bounded decode memory -------------------------------------------------------------------------


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    settings = make_settings(database_url, tmp_path, models, max_request_pixels=3 * 80 * 80)
    with TestClient(create_app(settings), headers=ADMIN) as client:
        three = enroll(client, "budget", jpeg(910), jpeg(911), jpeg(912))
        assert three.status_code == 201
        four = enroll(client, "budget-4", jpeg(913), jpeg(914), jpeg(915), jpeg(916))
        assert error(four) == (413, "pixel_budget_exceeded")
        assert four.json()["details"] == {"pixels": 4 * 80 * 80, "max_request_pixels": 3 * 80 * 80}


# 5. Image-quality gate ----------------------------------------------------------------------------


def test_flat_and_tiny_images_are_refused_at_enroll_and_identify(shared_client: TestClient) -> None:
    black = encode(Image.new("RGB", (500, 500)), "PNG")
    tiny = encode(photo(5).resize((1, 1)), "PNG")
    for data, reason in ((black, "flat"), (tiny, "too_small")):
        refused = enroll(shared_client, f"gate-{reason}", data)
        assert error(refused) == (422, "image_uninformative")
        assert refused.json()["details"]["reason"] == reason
        found = shared_client.post("/identify", data={"species": "dog"}, files={"image": data}, headers=READ)
        assert error(found) == (422, "image_uninformative")


def test_the_quality_gate_is_configurable(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    strict = make_settings(database_url, tmp_path, models, min_image_side=100)
    with TestClient(create_app(strict), headers=ADMIN) as client:
        assert error(enroll(client, "small", jpeg(920))) == (422, "image_uninformative")  # 80 px
    off = make_settings(database_url, tmp_path, models, min_image_std=0, min_image_side=1)
    with TestClient(create_app(off), headers=ADMIN) as client:
        assert enroll(client, "black", encode(Image.new("RGB", (40, 40)), "PNG")).status_code == 201


# 4. Open probes say up or down, never why ---------------------------------------------------------


def test_open_and_read_answers_carry_no_paths_or_hashes(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog", cat="cat")
    target = models / "cat"
    target.unlink()
    target.mkdir()
    (target / "model_card.json").write_text("{not json")
    with TestClient(create_app(make_settings(database_url, tmp_path, models))) as client:
        ready = client.get("/ready")
        assert ready.json() == {"ready": True, "checks": {"database": "up", "models": "up", "indexes": "up"}}
        refused = client.post("/identify", data={"species": "cat"}, files={"image": jpeg(1)}, headers=READ)
        listed = client.get("/species", headers=READ)
        for answer in (ready, refused, listed):
            assert str(tmp_path) not in answer.text and "model_card.json" not in answer.text, answer.text
        status = client.get("/status", headers=ADMIN).json()
        cat = next(item for item in status["species"] if item["name"] == "cat")
        assert str(target) in cat["detail"]
        assert error(client.get("/status", headers=READ)) == (403, "forbidden")


# 6. Audit log and failed keys ---------------------------------------------------------------------


def test_reloads_and_refused_keys_are_audited_and_readable(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    with TestClient(create_app(make_settings(database_url, tmp_path, models)), headers=ADMIN) as client:
        assert client.post("/species/dog/reload").status_code == 202
        assert error(client.get("/species", headers={"x-api-key": "wrong-key-123"})) == (401, "unauthorized")
        assert error(client.post("/species/dog/reload", headers=READ)) == (403, "forbidden")
        assert error(client.get("/individuals", headers={"x-api-key": ""})) == (401, "unauthorized")

        reloads = client.get("/audit", params={"action": "reload"}).json()
        assert reloads["count"] == 1
        entry = reloads["data"][0]
        assert entry["species"] == "dog" and entry["details"]["status"] == "ready"
        assert entry["actor"] == client.app.state.settings.keyring.authenticate(ADMIN_KEY).fingerprint

        refused = client.get("/audit", params={"action": "auth_refused"}).json()
        assert refused["count"] == 3
        newest, scope, wrong = refused["data"]  # newest first
        assert (newest["details"]["reason"], newest["actor"]) == ("missing_key", "unauthenticated")
        assert (scope["details"]["status"], scope["details"]["path"]) == (403, "/species/dog/reload")
        assert scope["actor"] != "unauthenticated"  # the existing key's fingerprint
        assert (wrong["details"]["reason"], wrong["details"]["client"]) == ("invalid_key", "testclient")
        assert "wrong-key-123" not in json.dumps(refused)

        page = client.get("/audit", params={"limit": 2, "offset": 1}).json()
        assert (page["count"], len(page["data"]), page["data"][0]["id"]) == (4, 2, scope["id"])
        later = client.get("/audit", params={"since": newest["created_at"]}).json()
        assert newest["id"] in [item["id"] for item in later["data"]]
        assert client.get("/audit", params={"individual_id": str(uuid.uuid4())}).json()["count"] == 0


def test_repeated_wrong_keys_from_one_address_get_429_with_retry_after(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    settings = make_settings(
        database_url, tmp_path, models, auth_failure_limit=3, auth_failure_window_seconds=60
    )
    with TestClient(create_app(settings)) as client:
        wrong = {"x-api-key": "guess-0000"}
        assert [client.get("/species", headers=wrong).status_code for _ in range(3)] == [401, 401, 401]
        limited = client.get("/species", headers=wrong)
        assert error(limited) == (429, "too_many_requests")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert error(client.get("/species", headers=READ)) == (429, "too_many_requests")  # no oracle
        assert client.get("/health").status_code == 200  # open routes are not limited
        assert client.get("/audit", params={"action": "auth_refused"}, headers=ADMIN).status_code == 429


# 8. Schema and behaviour agree --------------------------------------------------------------------


def test_405_names_every_method_of_the_path(shared_client: TestClient) -> None:
    some = uuid.uuid4()
    individual = shared_client.options(f"/individuals/{some}")
    assert individual.status_code == 405
    assert individual.headers["allow"] == "DELETE, GET, PATCH"
    image = shared_client.options(f"/individuals/{some}/images/{uuid.uuid4()}")
    assert (image.status_code, image.headers["allow"]) == (405, "DELETE, GET")
    assert shared_client.put("/enroll").headers["allow"] == "POST"


def test_schema_and_behaviour_agree_on_nulls_empty_patches_self_merges_and_errors(
    shared_client: TestClient,
) -> None:
    spec = shared_client.get("/openapi.json").json()
    for path in ("/enroll", "/identify", "/verify", "/explain"):
        form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        for name, prop in form["properties"].items():
            assert "null" not in json.dumps(prop), (path, name)  # unset form fields are left out
    patch = spec["paths"]["/individuals/{individual_id}"]["patch"]
    assert spec["components"]["schemas"]["IndividualUpdate"]["minProperties"] == 1
    made = enroll(shared_client, "agree", jpeg(930)).json()["individual"]
    assert error(shared_client.patch(f"/individuals/{made['id']}", json={})) == (422, "invalid_request")
    merged = shared_client.post(f"/individuals/{made['id']}/merge", json={"source_id": made["id"]})
    assert merged.status_code == 200 and merged.json()["moved_images"] == 0
    assert shared_client.get(f"/individuals/{made['id']}", headers=READ).json()["image_count"] == 1
    assert "400" in patch["responses"]
    assert "401" in spec["paths"]["/metrics"]["get"]["responses"]
    broken = shared_client.patch(
        f"/individuals/{made['id']}",
        content=b'{"name": "\xff"}',
        headers={"content-type": "application/json"},
    )
    assert error(broken) == (400, "malformed_body")


def test_an_offset_beyond_64_bits_is_a_validation_error_on_every_paged_listing(
    shared_client: TestClient,
) -> None:
    """No database takes it: the schema refuses it and names the parameter, before any query."""
    made = enroll(shared_client, "far-page", jpeg(905)).json()["individual"]["id"]
    too_far = 2**63
    for path in ("/individuals", f"/individuals/{made}/images", "/audit", "/review", "/jobs"):
        answer = shared_client.get(path, params={"offset": too_far}, headers=ADMIN)
        assert error(answer) == (422, "validation_error"), (path, answer.text)
        assert answer.json()["details"]["errors"][0]["loc"] == ["query", "offset"], answer.text
        last = shared_client.get(path, params={"offset": too_far - 1}, headers=ADMIN)
        assert last.status_code == 200 and last.json()["data"] == [], (path, last.text)


def test_an_audit_time_outside_the_years_1_to_9999_in_utc_is_a_validation_error(
    shared_client: TestClient,
) -> None:
    """A valid ISO time whose offset carries it out of the years 1 to 9999 in UTC, the instant the
    database compares, is refused by the schema with the parameter named (it was a 500)."""
    for name, value in (("until", "0001-01-01T00:01:00+03:03"), ("since", "9999-12-31T23:59:00-01:00")):
        answer = shared_client.get("/audit", params={name: value}, headers=ADMIN)
        assert error(answer) == (422, "validation_error"), (name, answer.text)
        assert answer.json()["details"]["errors"][0]["loc"] == ["query", name], answer.text
    edges = {"since": "0001-01-01T00:01:00+00:01", "until": "9999-12-31T23:59:00+00:00"}
    assert shared_client.get("/audit", params=edges, headers=ADMIN).status_code == 200
