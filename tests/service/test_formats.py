"""One image whitelist for training and serving: a photo the training package reads (ORL's PGM
faces among them) can be enrolled and identified, and its stored original comes back as it went in."""

from __future__ import annotations

import csv

from apps import READ, TestClient
from imagegen import encode, photo
from shared_data import shared_manifest

from service.ml.images import ImagePolicy, decode_image, sniff_format
from training.data import load_dataset
from training.preprocess import IMAGE_FORMATS, IMAGE_SUFFIXES


def test_every_file_name_training_reads_is_a_format_the_service_decodes() -> None:
    samples = {
        ".jpg": encode(photo(1), "JPEG"),
        ".png": encode(photo(1), "PNG"),
        ".webp": encode(photo(1), "WEBP"),
        ".bmp": encode(photo(1), "BMP"),
        ".pgm": encode(photo(1).convert("L"), "PPM"),
        ".ppm": encode(photo(1), "PPM"),
        ".pbm": encode(photo(1).convert("1"), "PPM"),
    }
    for suffix, data in samples.items():
        assert suffix in IMAGE_SUFFIXES
        decoded = decode_image(data, ImagePolicy(max_pixels=10**6, max_request_pixels=10**6))
        assert decoded.image.mode == "RGB" and sniff_format(data) in {f.decoder for f in IMAGE_FORMATS}


def test_a_pgm_face_enrolls_identifies_and_comes_back_as_stored(shared_client: TestClient) -> None:
    pgm = encode(photo(31).convert("L"), "PPM")
    enrolled = shared_client.post(
        "/enroll", data={"species": "dog", "external_id": "pgm-31"}, files={"images": ("face.pgm", pgm)}
    )
    assert enrolled.status_code == 201, enrolled.text
    body = enrolled.json()
    identified = shared_client.post("/identify", data={"species": "dog"}, files={"image": pgm}, headers=READ)
    assert identified.json()["best"]["external_id"] == "pgm-31"
    stored = shared_client.get(
        f"/individuals/{body['individual']['id']}/images/{body['images'][0]['image_id']}/file", headers=READ
    )
    assert stored.content == pgm
    assert stored.headers["content-type"] == "image/x-portable-anymap"


def test_real_orl_faces_are_accepted_by_training_and_the_service(shared_client: TestClient) -> None:
    manifest = shared_manifest("orl_faces")
    with manifest.open() as fh:
        first = next(csv.DictReader(fh))
    path = manifest.parent / first["path"]
    assert path.suffix == ".pgm"
    assert load_dataset(manifest, species="human").samples  # training reads the set
    response = shared_client.post(
        "/identify", data={"species": "dog"}, files={"image": (path.name, path.read_bytes())}, headers=READ
    )
    assert response.status_code == 200, response.text
