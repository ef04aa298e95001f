"""Property-based fuzzing of the API from its own OpenAPI document (Schemathesis), on each backend
(SQLite, the embedded default, refuses other values than Postgres: a 64-bit overflow was a 500 there).

Every operation is called with generated data, with the read key and with the admin key, and in
stateful sequences that follow the document's links (an enroll's answer names the individual and
image ids that the image-level operations then use). Checks: no 5xx, and every answer's status,
content type, headers and body match the document. Examples per operation are bounded so the run
stays short; the seed is fixed, so a failure reproduces.
"""

from __future__ import annotations

import base64
import copy
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from apps import ADMIN, ADMIN_KEY, READ_KEY, live_server, make_models_dir, make_settings
from databases import BACKENDS, provisioned_database
from hostile import corpus
from hypothesis import HealthCheck
from hypothesis import strategies as st
from imagegen import jpeg
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.serialization import Binary

from service.app import create_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
KEYS = {"read": READ_KEY, "admin": ADMIN_KEY}


def fuzzed(test: Callable[[schemathesis.Case], None]) -> Callable[[], None]:
    """``test`` as a Hypothesis test. The suite's run: 6 examples an operation, always the same
    ones, so that it stays short and a failure reproduces. A deeper run, by hand:
    ``ANIMALID_FUZZ_EXAMPLES=N`` examples an operation, other ones with ``ANIMALID_FUZZ_SEED=S``
    (a failure then reproduces with the same two values)."""
    seed = os.environ.get("ANIMALID_FUZZ_SEED")
    settings = hypothesis.settings(
        max_examples=int(os.environ.get("ANIMALID_FUZZ_EXAMPLES", "6")),
        deadline=None,
        derandomize=seed is None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    run = settings(test)
    return run if seed is None else hypothesis.seed(int(seed))(run)


def fuzzer_view(spec: dict[str, Any], images: list[bytes]) -> dict[str, Any]:
    """The document as the fuzzer reads it, narrowed so that requests reach the models: species
    drawn from the loaded ones and one that is not, base64 images drawn from ``images``, enrolls
    by external id with at most two images. Everything else as the service documents it."""
    view = copy.deepcopy(spec)
    encoded = {"type": "string", "enum": [base64.b64encode(data).decode() for data in images[::3]]}
    species = {"type": "string", "enum": ["dog", "cat", "wolf"]}
    for item in view["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] in ("species", "name") and parameter["in"] in ("query", "path"):
                    parameter["schema"] = species
            for media in operation.get("requestBody", {}).get("content", {}).values():
                properties = media["schema"].get("properties", {})
                if "species" in properties:
                    properties["species"] = species
                if "images" in properties:  # enroll names the individual by external id, always
                    properties.pop("individual_id", None)
                    media["schema"]["required"] = sorted(
                        {*media["schema"].get("required", []), "external_id"}
                    )
                    properties["images"]["maxItems"] = 2
                for name in ("image", "reference_image", "images"):
                    field = properties.get(name, {})
                    if field.get("type") == "array" and field["items"].get("format") != "binary":
                        field["items"] = encoded
                    elif name != "images" and field and field.get("format") != "binary":
                        properties[name] = encoded
    return view


@pytest.fixture(scope="module", params=BACKENDS)
def api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path]
) -> Iterator[schemathesis.BaseSchema]:
    root = tmp_path_factory.mktemp("fuzz")
    models = make_models_dir(root, artifacts, dog="dog", cat="cat")
    # Uploads: as many real photos as hostile ones (so enrolls succeed and links lead somewhere).
    hostile = [data for data, _, _ in corpus().values()]
    images = [jpeg(2000 + n % 8, n // 8) for n in range(len(hostile))] + hostile
    schemathesis.openapi.format("binary", st.sampled_from(images).map(Binary))
    with provisioned_database(request.param, root) as url:
        app = create_app(make_settings(url, root, models))
        with live_server(app) as base:
            for n in range(2):  # something to list, find and compare with from the start
                httpx.post(
                    f"{base}/enroll",
                    data={"species": "dog", "external_id": f"seed-{n}"},
                    files={"images": jpeg(2100 + n)},
                    headers=ADMIN,
                    timeout=60,
                ).raise_for_status()
            schema = schemathesis.openapi.from_dict(fuzzer_view(app.openapi(), images))
            schema.config.update(base_url=base)
            yield schema


def operations(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_operation_answers_within_its_schema(
    api: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    """Valid requests (positive) and requests the document forbids (negative), each sent once with
    either key."""
    for operation in operations(api):

        @fuzzed
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            for key in (READ_KEY, ADMIN_KEY):
                case.call_and_validate(headers={"x-api-key": key}, checks=CHECKS, timeout=60)

        try:
            fuzz()
        except hypothesis.errors.Unsatisfiable:
            # Nothing about it can be invalid (no parameters, no body): only the positive run applies.
            assert mode is GenerationMode.NEGATIVE, operation.label


IMAGE_ROUTES = (
    "/individuals/{individual_id}/images/{image_id}",
    "/individuals/{individual_id}/images/{image_id}/file",
)


def answered(schema: schemathesis.BaseSchema, route: str, status: str) -> float:
    """How many requests the server has answered on ``route`` with ``status`` (its own metrics)."""
    text = httpx.get(f"{schema.config.base_url}/metrics", headers=ADMIN, timeout=60).text
    pattern = (
        rf'animalid_http_requests_total{{method="[A-Z]+",route="{re.escape(route)}",status="{status}"}} (\S+)'
    )
    return sum(float(count) for count in re.findall(pattern, text))


def pointer(document: Any, expression: str) -> Any:
    """Evaluate a link's ``$response.body#/a/0/b`` against an answer's JSON body."""
    for part in expression.removeprefix("$response.body#/").split("/"):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


@pytest.mark.parametrize("scope", sorted(KEYS))
def test_operations_reached_through_the_enroll_links_get_real_ids(
    api: schemathesis.BaseSchema, scope: str
) -> None:
    """Stateful: for each link the document declares on an enroll's answer, a real enroll (admin
    key) gives the ids, and the linked operation is fuzzed with them in its path and generated data
    elsewhere, with the scope's key."""
    key = KEYS[scope]
    spec = api.raw_schema
    labels = {
        item[method]["operationId"]: f"{method.upper()} {path}"
        for path, item in spec["paths"].items()
        for method in item
    }
    by_label = {operation.label: operation for operation in operations(api)}
    links = spec["paths"]["/enroll"]["post"]["responses"]["201"]["links"]
    before = sum(answered(api, route, "200") for route in IMAGE_ROUTES)
    for number, (name, link) in enumerate(sorted(links.items())):
        made = httpx.post(
            f"{api.config.base_url}/enroll",
            data={"species": "dog", "external_id": f"linked-{scope}-{name}"},
            files={"images": jpeg(2200 + number)},
            headers=ADMIN,
            timeout=60,
        )
        assert made.status_code == 201, made.text
        ids = {parameter: pointer(made.json(), value) for parameter, value in link["parameters"].items()}
        target = by_label[labels[link["operationId"]]]

        @fuzzed
        @hypothesis.given(case=target.as_strategy(path_parameters=ids))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"x-api-key": key}, checks=CHECKS, timeout=60)

        fuzz()
    if scope == "read":  # the read key reads what the links point at
        assert sum(answered(api, route, "200") for route in IMAGE_ROUTES) > before, "no link reached an image"
