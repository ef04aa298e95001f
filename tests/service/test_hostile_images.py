"""Every image-taking endpoint against the hostile corpus (hostile.py): the expected 4xx with its
code, or a normal answer, and never a 5xx. Each image goes in every image field of every endpoint,
as a multipart file and (identify) as base64 JSON."""

from __future__ import annotations

import base64

import pytest
from apps import ADMIN, READ, TestClient
from hostile import OK, corpus
from imagegen import jpeg

CORPUS = corpus()
GOOD = jpeg(40)


def check(response, status: int, code: str | None, where: str) -> None:  # noqa: ANN001
    assert response.status_code < 500, (where, response.text)
    assert response.status_code == status, (where, response.status_code, response.text[:300])
    if code is not None:
        body = response.json()
        assert body["code"] == code, (where, body)
        assert set(body) == {"code", "message", "details"}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_image_endpoint_refuses_or_serves_each_hostile_image(
    shared_client: TestClient, name: str
) -> None:
    data, status, code = CORPUS[name]
    upload = ("photo.jpg", data, "image/jpeg")
    good = ("good.jpg", GOOD, "image/jpeg")
    form = {"species": "dog"}

    check(
        shared_client.post("/identify", data=form, files={"image": upload}, headers=READ),
        status,
        code,
        "identify",
    )
    as_json = {"species": "dog", "image": base64.b64encode(data).decode()}
    if data:  # an empty base64 string is refused by the JSON schema itself
        check(shared_client.post("/identify", json=as_json, headers=READ), status, code, "identify json")

    enrolled = shared_client.post(
        "/enroll", data={**form, "external_id": f"hostile-{name}"}, files={"images": upload}, headers=ADMIN
    )
    check(enrolled, 201 if status == OK else status, code, "enroll")
    mixed = shared_client.post(
        "/enroll",
        data={**form, "external_id": f"hostile-mixed-{name}"},
        files=[("images", good), ("images", upload)],
        headers=ADMIN,
    )
    check(mixed, 201 if status == OK else status, code, "enroll with a good image first")
    if status != OK:  # refused as a whole: the good image was not enrolled either
        listed = shared_client.get(
            "/individuals", params={"external_id": f"hostile-mixed-{name}"}, headers=READ
        )
        assert listed.json()["count"] == 0

    for path in ("/verify", "/explain"):
        as_image = shared_client.post(
            path, data=form, files={"image": upload, "reference_image": good}, headers=READ
        )
        check(as_image, status, code, f"{path} image")
        as_reference = shared_client.post(
            path, data=form, files={"image": good, "reference_image": upload}, headers=READ
        )
        check(as_reference, status, code, f"{path} reference_image")
        if code is not None:
            assert as_reference.json()["details"].get("field", "reference_image") == "reference_image"
