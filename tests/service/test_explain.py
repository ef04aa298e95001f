"""POST /explain: the picture of both photos with their heat maps, and the JSON variant with the raw maps."""

from __future__ import annotations

import base64
import io
import uuid

import numpy as np
import pytest
from apps import READ
from fastapi.testclient import TestClient
from imagegen import jpeg
from PIL import Image

from service.ml.images import ImagePolicy, decode_image


@pytest.fixture(scope="module")
def rex(shared_client: TestClient) -> dict:
    files = [("images", (f"{s}.jpg", jpeg(300, s, size=96), "image/jpeg")) for s in range(3)]
    response = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": f"rex-{uuid.uuid4()}"}, files=files
    )
    assert response.status_code == 201
    return response.json()


def _panel_size(client: TestClient) -> tuple[int, int]:
    """The picture of a reference image and a same-size photo: the size every picture of it has."""
    response = client.post(
        "/explain",
        data={"species": "dog"},
        files={
            "image": ("q.jpg", jpeg(304, 0), "image/jpeg"),
            "reference_image": ("r.jpg", jpeg(304, 1), "image/jpeg"),
        },
        headers=READ,
    )
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content)).size


def test_png_picture_against_an_individual(shared_client: TestClient, rex: dict) -> None:
    response = shared_client.post(
        "/explain",
        data={"species": "dog", "individual_id": rex["individual"]["id"]},
        files={"image": ("q.jpg", jpeg(300, 7, size=96), "image/jpeg")},
        headers=READ,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    limit = shared_client.app.state.settings.explain_max_side
    # Two photos side by side, each scaled to half the limit, with the text and the key around them.
    assert picture.format == "PNG" and limit <= picture.width <= limit + 64
    assert limit // 2 < picture.height < picture.width
    assert float(response.headers["x-similarity"]) > 0.9
    assert response.headers["x-reference-image-id"] in {i["image_id"] for i in rex["images"]}


def test_json_variant_has_the_raw_map_at_model_resolution(shared_client: TestClient, rex: dict) -> None:
    response = shared_client.post(
        "/explain",
        params={"format": "json"},
        data={"species": "dog", "individual_id": rex["individual"]["id"]},
        files={"image": ("q.jpg", jpeg(300, 8, size=96), "image/jpeg")},
        headers=READ,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    for key in ("heatmap", "reference_heatmap"):
        heatmap = np.asarray(body[key])
        assert heatmap.shape == (body["height"], body["width"]) == (64, 64), key
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and heatmap.max() > 0.0, key
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG"
    # The reference is the individual's enrolled photo most similar to the query.
    serving = shared_client.app.state.runtime.registry.serving("dog")
    policy = ImagePolicy(max_pixels=10**8, max_request_pixels=10**8)
    photos = [jpeg(300, s, size=96) for s in (0, 1, 2, 8)]
    vectors = serving.embedder.embed([decode_image(data, policy).image for data in photos])
    best = int(np.argmax(vectors[:3] @ vectors[3]))
    assert body["reference_image_id"] == rex["images"][best]["image_id"]
    assert body["similarity"] == pytest.approx(float(vectors[best] @ vectors[3]), abs=1e-4)


def test_explain_against_a_reference_photo_as_base64_json(shared_client: TestClient) -> None:
    payload = {
        "species": "dog",
        "image": base64.b64encode(jpeg(301, 0)).decode(),
        "reference_image": base64.b64encode(jpeg(301, 1)).decode(),
    }
    response = shared_client.post("/explain?format=json", json=payload, headers=READ)
    assert response.status_code == 200, response.text
    assert response.json()["reference_image_id"] is None
    assert response.json()["individual_id"] is None


def test_a_portrait_model_maps_at_its_own_height_and_width(shared_client: TestClient) -> None:
    payload = {
        "species": "cat",  # the test cat model takes 64 x 32 (height x width) inputs
        "image": base64.b64encode(jpeg(303, 0)).decode(),
        "reference_image": base64.b64encode(jpeg(303, 1)).decode(),
    }
    response = shared_client.post("/explain?format=json", json=payload, headers=READ)
    assert response.status_code == 200, response.text
    body = response.json()
    assert np.asarray(body["heatmap"]).shape == (body["height"], body["width"]) == (64, 32)


def test_large_photos_are_drawn_at_a_bounded_size(shared_client: TestClient) -> None:
    big = jpeg(302, 0, size=1200)
    response = shared_client.post(
        "/explain",
        data={"species": "dog"},
        files={
            "image": ("q.jpg", big, "image/jpeg"),
            "reference_image": ("r.jpg", jpeg(302, 1), "image/jpeg"),
        },
        headers=READ,
    )
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == _panel_size(shared_client)


def test_explain_refusals(shared_client: TestClient) -> None:
    image = {"image": ("q.jpg", jpeg(1), "image/jpeg")}
    neither = shared_client.post("/explain", data={"species": "dog"}, files=image, headers=READ)
    assert (neither.status_code, neither.json()["code"]) == (422, "invalid_request")
    missing = shared_client.post(
        "/explain", data={"species": "dog", "individual_id": str(uuid.uuid4())}, files=image, headers=READ
    )
    assert (missing.status_code, missing.json()["code"]) == (404, "individual_not_found")
    bad_format = shared_client.post("/explain?format=gif", data={"species": "dog"}, files=image, headers=READ)
    assert (bad_format.status_code, bad_format.json()["code"]) == (422, "validation_error")


def test_explain_compares_exactly_like_verify(shared_client: TestClient, rex: dict) -> None:
    """One comparison behind both: the same similarity and reference image, and the same refusals."""
    cat = shared_client.post(
        "/enroll",
        json={
            "species": "cat",
            "external_id": f"cat-{uuid.uuid4()}",
            "images": [base64.b64encode(jpeg(302)).decode()],
        },
    ).json()["individual"]["id"]
    query = ("q.jpg", jpeg(300, 9, size=96), "image/jpeg")
    photo = ("r.jpg", jpeg(300, 1, size=96), "image/jpeg")
    agree = [
        ({"individual_id": rex["individual"]["id"]}, {"image": query}),
        ({}, {"image": query, "reference_image": photo}),
    ]
    for fields, files in agree:
        data = {"species": "dog", **fields}
        verified = shared_client.post("/verify", data=data, files=files, headers=READ).json()
        explained = shared_client.post(
            "/explain", params={"format": "json"}, data=data, files=files, headers=READ
        ).json()
        assert explained["similarity"] == verified["similarity"], fields
        assert explained["reference_image_id"] == verified["best_image_id"], fields
    refused = [
        ({"species": "dog"}, {"image": query}),
        (
            {"species": "dog", "individual_id": rex["individual"]["id"]},
            {"image": query, "reference_image": photo},
        ),
        ({"species": "dog", "individual_id": str(uuid.uuid4())}, {"image": query}),
        ({"species": "dog", "individual_id": cat}, {"image": query}),
        ({"species": "wolf"}, {"image": query, "reference_image": photo}),
        ({"species": "dog"}, {"image": query, "reference_image": ("r.gif", b"GIF89a", "image/gif")}),
    ]
    for data, files in refused:
        verified = shared_client.post("/verify", data=data, files=files, headers=READ)
        explained = shared_client.post("/explain", data=data, files=files, headers=READ)
        assert verified.status_code >= 400, (data, verified.text)
        assert (explained.status_code, explained.json()) == (verified.status_code, verified.json()), data


def test_a_missing_stored_reference_is_a_404(shared_client: TestClient) -> None:
    enrolled = shared_client.post(
        "/enroll",
        data={"species": "dog", "external_id": f"gone-{uuid.uuid4()}"},
        files=[("images", ("0.jpg", jpeg(305, 0, size=96), "image/jpeg"))],
    ).json()
    image_id = uuid.UUID(enrolled["images"][0]["image_id"])
    store = shared_client.app.state.runtime.store
    (stored,) = store.root.rglob(f"{image_id.hex}.*")
    stored.unlink()
    response = shared_client.post(
        "/explain",
        data={"species": "dog", "individual_id": enrolled["individual"]["id"]},
        files={"image": ("q.jpg", jpeg(305, 1, size=96), "image/jpeg")},
        headers=READ,
    )
    assert (response.status_code, response.json()["code"]) == (404, "image_not_found")
    assert response.json()["details"]["image_id"] == str(image_id)
