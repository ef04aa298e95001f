"""/species, /health, /ready, /metrics, OpenAPI, and species whose artifact is missing or corrupt."""

from __future__ import annotations

import gc
import json
import shutil
import time
import weakref
from pathlib import Path

import pytest
import torch
from apps import ADMIN, READ, AppRunner, make_models_dir, make_settings
from fastapi.testclient import TestClient
from imagegen import jpeg
from pydantic import BaseModel

from service import schemas
from service.app import create_app
from service.errors import ConfigurationError
from service.settings import Settings


def test_species_lists_models_thresholds_and_card_metrics(
    client: TestClient, artifacts: dict[str, Path]
) -> None:
    response = client.get("/species", headers=READ)
    assert response.status_code == 200
    species = {item["name"]: item for item in response.json()["data"]}
    assert set(species) == {"cat", "dog"}
    dog = species["dog"]
    card = json.loads((artifacts["dog"] / "model_card.json").read_text())
    assert dog["status"] == "ready" and dog["reason"] is None
    assert dog["model_version"] == card["model_version"]
    assert (dog["threshold"], dog["threshold_source"], dog["threshold_far"]) == (
        card["threshold"],
        "model_card",
        0.01,
    )
    assert dog["metrics"] == card["metrics"]
    assert dog["input_size"] == [64, 64] and dog["embedding_dim"] == 512
    assert dog["device"] == "cpu" and dog["index_on_gpu"] is False
    assert species["cat"]["threshold_source"] == "default"
    assert species["cat"]["input_size"] == [64, 32]  # (height, width): a portrait model
    one = client.get("/species/dog", headers=READ).json()
    assert one == dog
    missing = client.get("/species/wolf", headers=READ)
    assert (missing.status_code, missing.json()["code"]) == (404, "species_not_found")


def test_health_and_ready_need_no_key(client: TestClient) -> None:
    client.post("/enroll", data={"species": "dog", "external_id": "a"}, files={"images": jpeg(1)})
    assert client.get("/health", headers={}).json() == {"status": "ok"}
    ready = client.get("/ready", headers={})
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"database": "up", "models": "up", "indexes": "up"}}
    body = client.get("/status").json()
    assert body["ready"] is True and body["database"]["ok"] is True
    dog = next(item for item in body["species"] if item["name"] == "dog")
    assert (dog["index_size"], dog["database_embeddings"], dog["database_images"]) == (1, 1, 1)
    assert dog["consistent"] is True


def test_ready_reports_an_index_that_disagrees_with_the_database(client: TestClient) -> None:
    client.post("/enroll", data={"species": "dog", "external_id": "a"}, files={"images": jpeg(1)})
    gallery = client.app.state.runtime.registry.serving("dog").gallery
    follower = client.app.state.runtime.follower
    if follower is not None:  # Postgres: the enroll's change is applied (again) now, not after the removal
        follower.catch_up()
    ids, _ = gallery.snapshot()
    gallery.remove(ids[:1])  # simulate a lost index write
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "up", "models": "up", "indexes": "down"}
    dog = next(item for item in client.get("/status").json()["species"] if item["name"] == "dog")
    assert dog["consistent"] is False and (dog["index_size"], dog["database_embeddings"]) == (0, 1)


def corrupt(models: Path, how: str) -> None:
    target = models / "cat"
    resolved = target.resolve()
    target.unlink()
    shutil.copytree(resolved, target)
    if how == "truncated":
        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "no_card":
        (target / "model_card.json").unlink()
    elif how == "bad_json":
        (target / "model_card.json").write_text("{not json")
    elif how == "wrong_species":
        card = json.loads((target / "model_card.json").read_text())
        card["species"] = "horse"
        (target / "model_card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    "how,reason",
    [("truncated", "sha256"), ("no_card", "missing"), ("bad_json", "JSON"), ("wrong_species", "horse")],
)
def test_a_broken_artifact_disables_only_its_species(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path], how: str, reason: str
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog", cat="cat")
    corrupt(models, how)
    with TestClient(create_app(make_settings(database_url, tmp_path, models)), headers=READ) as client:
        species = {item["name"]: item for item in client.get("/species").json()["data"]}
        assert species["cat"]["status"] == "disabled"
        assert species["cat"]["reason"] == "the model artifact could not be loaded"  # no paths, no hashes
        assert species["dog"]["status"] == "ready"
        ready = client.get("/ready")
        assert ready.status_code == 200  # the dog still serves
        status = client.get("/status", headers=ADMIN).json()
        cat = next(item for item in status["species"] if item["name"] == "cat")
        assert cat["status"] == "disabled" and reason in cat["detail"]
        refused = client.post("/identify", data={"species": "cat"}, files={"image": jpeg(1)})
        assert (refused.status_code, refused.json()["code"]) == (503, "species_unavailable")
        assert str(tmp_path) not in refused.text and reason not in refused.json()["message"]
        served = client.post("/identify", data={"species": "dog"}, files={"image": jpeg(1)})
        assert served.status_code == 200


def test_a_stopped_app_lets_go_of_its_models_and_indexes(settings: Settings) -> None:
    """FastAPI keeps every app it builds for good (its caches hold the docs routes, closures over
    the app), so a stopped app must not keep its runtime: a process that starts apps again and again
    (the test suite) would keep a model and an index of each."""
    app = create_app(settings)
    with TestClient(app, headers=ADMIN) as client:
        assert client.post("/identify", data={"species": "dog"}, files={"image": jpeg(1)}).status_code == 200
        runtime = weakref.ref(app.state.runtime)
        embedder = weakref.ref(app.state.runtime.registry.serving("dog").embedder)
    assert not hasattr(app.state, "runtime")
    # The threads that served the request may still be exiting, their last frames not yet freed.
    deadline = time.monotonic() + 10
    while (runtime() is not None or embedder() is not None) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert runtime() is None
    assert embedder() is None


def test_no_usable_model_at_all_is_not_ready(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with TestClient(create_app(make_settings(database_url, tmp_path, tmp_path / "models"))) as client:
        assert client.get("/ready").status_code == 503
        assert client.get("/health").status_code == 200


def test_species_known_only_to_the_database_is_listed_as_disabled(
    database_url: str, tmp_path: Path, artifacts: dict[str, Path], runner: AppRunner
) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog", cat="cat")
    settings = make_settings(database_url, tmp_path, models)
    first = runner.start(settings)
    first.post("/enroll", data={"species": "cat", "external_id": "tom"}, files={"images": jpeg(1)})
    runner.stop(first)
    (models / "cat").unlink()
    second = runner.start(settings)
    cat = next(item for item in second.get("/species").json()["data"] if item["name"] == "cat")
    assert cat["status"] == "disabled" and "no model artifact" in cat["reason"]
    assert cat["individuals"] == 1 and cat["images"] == 1
    listed = second.get("/individuals", params={"species": "cat"}).json()
    assert listed["count"] == 1


def test_metrics_count_requests_by_route_and_expose_index_sizes(client: TestClient) -> None:
    client.post("/enroll", data={"species": "dog", "external_id": "a"}, files={"images": jpeg(1)})
    for _ in range(2):
        client.post("/identify", data={"species": "dog"}, files={"image": jpeg(2)}, headers=READ)
    client.get("/individuals/00000000-0000-0000-0000-000000000000", headers=READ)
    text = client.get("/metrics", headers=READ).text
    assert 'animalid_http_requests_total{method="POST",route="/identify",status="200"} 2.0' in text
    assert 'route="/individuals/{individual_id}",status="404"' in text
    assert 'animalid_http_request_duration_seconds_count{method="POST",route="/identify"} 2.0' in text
    assert 'animalid_inference_seconds_count{operation="embed",species="dog"} 3.0' in text
    assert 'animalid_search_seconds_count{species="dog"} 2.0' in text
    assert 'animalid_index_vectors{species="dog"} 1.0' in text
    assert client.get("/metrics", headers={"x-api-key": ""}).status_code == 401


def test_schema_examples_are_valid_instances() -> None:
    models = [
        m
        for m in vars(schemas).values()
        if isinstance(m, type) and issubclass(m, BaseModel) and m is not BaseModel
    ]
    checked = 0
    for model in models:
        extra = model.model_config.get("json_schema_extra")
        for example in extra.get("examples", []) if isinstance(extra, dict) else []:
            model.model_validate(example)
            checked += 1
    assert checked >= 20


def has_own_example(spec: dict, node: dict) -> bool:
    """An example of this whole value: on the media type, the parameter, or the (referenced) schema
    itself. Examples deeper inside do not count: every error response carries one, for instance."""
    if "example" in node or node.get("examples"):
        return True
    schema = node.get("schema", {})
    ref = schema.get("$ref")
    if isinstance(ref, str):
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return "example" in schema or bool(schema.get("examples"))


def missing_examples(spec: dict, op: dict) -> list[str]:
    """What a client cannot see an example of: each parameter, the request body (in one of its
    media types), and every non-binary media type of each success response (which must have one)."""
    missing = [f"parameter {p['name']}" for p in op.get("parameters", []) if not has_own_example(spec, p)]
    body = op.get("requestBody", {}).get("content", {})
    if body and not any(has_own_example(spec, media) for media in body.values()):
        missing.append("request body")
    for status, response in op["responses"].items():
        if not status.startswith("2"):
            continue
        content = response.get("content", {})
        if not content:
            missing.append(f"{status} response (no content)")
        for media_type, media in content.items():
            binary = media.get("schema", {}).get("format") == "binary" or media_type.startswith("image/")
            if not binary and not has_own_example(spec, media):
                missing.append(f"{status} {media_type}")
    return missing


def test_openapi_documents_every_endpoint_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    expected = {
        ("post", "/enroll"),
        ("post", "/identify"),
        ("post", "/verify"),
        ("post", "/explain"),
        ("get", "/individuals"),
        ("get", "/individuals/{individual_id}"),
        ("patch", "/individuals/{individual_id}"),
        ("delete", "/individuals/{individual_id}"),
        ("post", "/individuals/{individual_id}/merge"),
        ("get", "/individuals/{individual_id}/images"),
        ("get", "/individuals/{individual_id}/images/{image_id}"),
        ("get", "/individuals/{individual_id}/images/{image_id}/file"),
        ("delete", "/individuals/{individual_id}/images/{image_id}"),
        ("get", "/species"),
        ("get", "/species/{name}"),
        ("post", "/species/{name}/reload"),
        ("post", "/species/{name}/finetune"),
        ("post", "/species/{name}/herd-check"),
        ("get", "/jobs"),
        ("get", "/jobs/{job_id}"),
        ("post", "/jobs/{job_id}/cancel"),
        ("get", "/health"),
        ("get", "/ready"),
        ("get", "/status"),
        ("get", "/audit"),
        ("get", "/metrics"),
        ("get", "/review"),
        ("get", "/review/{review_id}"),
        ("get", "/review/{review_id}/image"),
        ("post", "/review/{review_id}/resolve"),
    }
    operations = {(m, p): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert set(operations) == expected
    assert [key for key, op in operations.items() if not op.get("summary")] == []
    gaps = {key: missing_examples(spec, op) for key, op in operations.items()}
    assert {key: gap for key, gap in gaps.items() if gap} == {}
    for key in [("post", "/enroll"), ("post", "/identify"), ("post", "/verify"), ("post", "/explain")]:
        content = operations[key]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content), key
        assert content["application/json"]["examples"], key
    assert "x-api-key" in json.dumps(spec["components"]["securitySchemes"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_fails_at_start(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path, tmp_path / "models", device="cuda")
    with pytest.raises(ConfigurationError, match="CUDA"), TestClient(create_app(settings)):
        pass


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_device_serves_on_cuda(database_url: str, tmp_path: Path, artifacts: dict[str, Path]) -> None:
    models = make_models_dir(tmp_path, artifacts, dog="dog")
    with TestClient(create_app(make_settings(database_url, tmp_path, models)), headers=READ) as client:
        assert client.get("/species/dog").json()["device"].startswith("cuda")
