"""POST /identify and POST /verify: individuals not images, the open-set decision, thresholds."""

from __future__ import annotations

import base64
import uuid

import numpy as np
import pytest
from apps import DOG_THRESHOLD, READ
from fastapi.testclient import TestClient
from imagegen import jpeg


def enroll(client: TestClient, individual: int, shots: range = range(2), species: str = "dog") -> dict:
    files = [("images", (f"{s}.jpg", jpeg(individual, s), "image/jpeg")) for s in shots]
    data = {
        "species": species,
        "external_id": f"ind-{individual}-{uuid.uuid4().hex[:6]}",
        "name": f"n{individual}",
    }
    response = client.post("/enroll", data=data, files=files)
    assert response.status_code == 201, response.text
    return response.json()


def identify(client: TestClient, image: bytes, **fields: object) -> dict:
    data = {
        "species": "dog",
        **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()},
    }
    response = client.post(
        "/identify", data=data, files={"image": ("q.jpg", image, "image/jpeg")}, headers=READ
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def gallery(shared_client: TestClient) -> dict[int, dict]:
    """Six dogs, two photos each."""
    return {i: enroll(shared_client, i) for i in range(200, 206)}


def test_a_new_photo_of_an_enrolled_dog_is_a_match(
    shared_client: TestClient, gallery: dict[int, dict]
) -> None:
    body = identify(shared_client, jpeg(203, 5))
    assert body["decision"] == "match"
    assert body["best"]["individual_id"] == gallery[203]["individual"]["id"]
    assert body["best"]["external_id"] == gallery[203]["individual"]["external_id"]
    assert body["best"]["image_id"] in {image["image_id"] for image in gallery[203]["images"]}
    assert body["threshold"] == pytest.approx(DOG_THRESHOLD)
    assert body["threshold_source"] == "model_card"
    assert body["best"]["similarity"] >= DOG_THRESHOLD
    assert body["timings"] is None


def test_a_dog_nobody_enrolled_is_unknown_but_candidates_are_listed(
    shared_client: TestClient, gallery: dict[int, dict]
) -> None:
    body = identify(shared_client, jpeg(299, 0), top_k=3)
    assert body["decision"] == "unknown"
    assert body["best"] is None
    assert 1 <= len(body["candidates"]) <= 3
    assert body["candidates"][0]["similarity"] < body["threshold"]


def test_top_k_lists_each_individual_once_best_first(
    shared_client: TestClient, gallery: dict[int, dict]
) -> None:
    body = identify(shared_client, jpeg(201, 0), top_k=4)
    ids = [c["individual_id"] for c in body["candidates"]]
    assert len(ids) == 4 == len(set(ids))
    sims = [c["similarity"] for c in body["candidates"]]
    assert sims == sorted(sims, reverse=True)
    assert ids[0] == gallery[201]["individual"]["id"]
    assert sims[0] == pytest.approx(1.0, abs=1e-4)  # the very same photo is enrolled
    assert body["gallery_size"] >= 12


def test_the_threshold_can_be_set_per_request(shared_client: TestClient, gallery: dict[int, dict]) -> None:
    strict = identify(shared_client, jpeg(202, 7), threshold=0.9999)
    assert (strict["decision"], strict["threshold_source"], strict["threshold"]) == (
        "unknown",
        "request",
        0.9999,
    )
    lax = identify(shared_client, jpeg(299, 1), threshold=-1)
    assert lax["decision"] == "match"
    assert lax["best"] == lax["candidates"][0]


def test_timings_on_request(shared_client: TestClient, gallery: dict[int, dict]) -> None:
    timings = identify(shared_client, jpeg(204, 0), include_timings=True)["timings"]
    assert timings["embed_ms"] > 0 and timings["decode_ms"] > 0 and timings["search_ms"] >= 0
    assert timings["total_ms"] >= timings["embed_ms"]


def test_base64_json_identify(shared_client: TestClient, gallery: dict[int, dict]) -> None:
    payload = {"species": "dog", "image": base64.b64encode(jpeg(205, 3)).decode(), "top_k": 2}
    response = shared_client.post("/identify", json=payload, headers=READ)
    assert response.status_code == 200
    assert response.json()["best"]["individual_id"] == gallery[205]["individual"]["id"]
    assert len(response.json()["candidates"]) == 2


def test_species_without_a_calibrated_threshold_uses_the_default(shared_client: TestClient) -> None:
    enroll(shared_client, 210, species="cat")
    data = {"species": "cat"}
    body = shared_client.post("/identify", data=data, files={"image": jpeg(210, 4)}, headers=READ).json()
    settings = shared_client.app.state.settings
    assert (body["threshold_source"], body["threshold"]) == ("default", settings.default_threshold)
    assert body["decision"] == "match"


def test_identify_refusals(shared_client: TestClient) -> None:
    image = {"image": ("q.jpg", jpeg(1), "image/jpeg")}
    cases = [
        ({"species": "wolf"}, image, 404, "species_not_found"),
        ({"species": "dog", "top_k": "0"}, image, 422, "validation_error"),
        ({"species": "dog", "top_k": "100000"}, image, 422, "invalid_request"),
        ({"species": "dog", "threshold": "2"}, image, 422, "validation_error"),
        ({"species": "dog"}, {"photo": ("q.jpg", jpeg(1), "image/jpeg")}, 422, "invalid_request"),
        ({"species": "dog"}, [("image", jpeg(1)), ("image", jpeg(2))], 422, "invalid_request"),
        (
            {"species": "dog", "image": "not a file"},
            {"x": ("q.jpg", b"", "image/jpeg")},
            422,
            "invalid_request",
        ),
    ]
    for data, files, status, code in cases:
        response = shared_client.post("/identify", data=data, files=files, headers=READ)
        assert (response.status_code, response.json()["code"]) == (status, code), (data, response.text)


def test_identify_on_an_empty_gallery_is_unknown(client: TestClient) -> None:
    body = identify(client, jpeg(1))
    assert body == {**body, "decision": "unknown", "best": None, "candidates": [], "gallery_size": 0}


def verify(client: TestClient, image: bytes, **kwargs: object) -> dict:
    data = {"species": "dog", **{k: str(v) for k, v in kwargs.items() if k != "reference"}}
    files = {"image": ("q.jpg", image, "image/jpeg")}
    if "reference" in kwargs:
        files["reference_image"] = ("r.jpg", kwargs["reference"], "image/jpeg")
    response = client.post("/verify", data=data, files=files, headers=READ)
    assert response.status_code == 200, response.text
    return response.json()


def test_verify_against_an_individual_takes_its_best_image(
    shared_client: TestClient, gallery: dict[int, dict]
) -> None:
    target = gallery[200]
    query = jpeg(200, 9)
    body = verify(shared_client, query, individual_id=target["individual"]["id"])
    assert body["decision"] == "match"
    assert body["compared_images"] == 2
    # The oracle: cosine similarity of the query with each enrolled photo, embedded by the same model.
    embedder = shared_client.app.state.runtime.registry.serving("dog").embedder
    from service.ml.images import ImagePolicy, decode_image

    policy = ImagePolicy(max_pixels=10**8, max_request_pixels=10**8)
    vectors = embedder.embed([decode_image(jpeg(200, s), policy).image for s in (0, 1, 9)])
    sims = vectors[:2] @ vectors[2]
    assert body["similarity"] == pytest.approx(float(sims.max()), abs=1e-4)
    assert body["best_image_id"] == target["images"][int(np.argmax(sims))]["image_id"]

    other = verify(shared_client, jpeg(201, 9), individual_id=target["individual"]["id"])
    assert other["decision"] == "unknown"


def test_verify_two_photos(shared_client: TestClient) -> None:
    same = verify(shared_client, jpeg(220, 0), reference=jpeg(220, 1), include_timings="true")
    assert same["decision"] == "match" and same["similarity"] > 0.9 and same["compared_images"] == 1
    assert same["timings"]["embed_ms"] > 0
    different = verify(shared_client, jpeg(220, 0), reference=jpeg(221, 0))
    assert different["decision"] == "unknown"
    forced = verify(shared_client, jpeg(220, 0), reference=jpeg(221, 0), threshold="-1")
    assert forced["decision"] == "match" and forced["threshold_source"] == "request"


def test_verify_refusals(shared_client: TestClient, gallery: dict[int, dict]) -> None:
    cat = enroll(shared_client, 230, species="cat")
    image = {"image": ("q.jpg", jpeg(1), "image/jpeg")}
    both = {**image, "reference_image": ("r.jpg", jpeg(2), "image/jpeg")}
    dog_id = gallery[200]["individual"]["id"]
    cases = [
        ({"species": "dog"}, image, 422, "invalid_request"),
        ({"species": "dog", "individual_id": dog_id}, both, 422, "invalid_request"),
        ({"species": "dog", "individual_id": str(uuid.uuid4())}, image, 404, "individual_not_found"),
        ({"species": "dog", "individual_id": cat["individual"]["id"]}, image, 409, "species_mismatch"),
        ({"species": "dog", "individual_id": "not-a-uuid"}, image, 422, "validation_error"),
    ]
    for data, files, status, code in cases:
        response = shared_client.post("/verify", data=data, files=files, headers=READ)
        assert (response.status_code, response.json()["code"]) == (status, code), (data, response.text)
