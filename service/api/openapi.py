"""OpenAPI helpers: request bodies offered as multipart and as JSON, and the error responses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.schemas import ErrorBody
from training.preprocess import FORMATS_TEXT

ERROR_EXAMPLES = {
    400: ("malformed_body", "the body is not valid JSON"),
    401: ("unauthorized", "missing API key: send it in the x-api-key header"),
    403: ("forbidden", "this API key has the read scope; admin is needed"),
    404: ("species_not_found", "unknown species 'wolf'"),
    409: ("species_mismatch", "individual 0b6f... is not a dog"),
    413: ("payload_too_large", "the request body exceeds 10485760 bytes"),
    415: ("unsupported_media_type", f"image is not a {FORMATS_TEXT} image"),
    422: ("image_unreadable", "image could not be decoded as JPEG"),
    429: ("too_many_requests", "too many failed API key checks from this address; retry in 42 s"),
    503: ("species_unavailable", "species 'cat' is not serving: the model artifact could not be loaded"),
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again (429, and 503 database_unavailable)",
        "schema": {"type": "integer"},
    }
}
# Operations that never touch the database (their 503, if any, is their own).
NO_DATABASE = {("get", "/health"), ("get", "/ready"), ("get", "/metrics"), ("get", "/status")}

# Links from what enroll returns to the operations that take its ids, for clients and for stateful
# testing (each enroll answer leads to the individual and its first image).
_INDIVIDUAL = {"individual_id": "$response.body#/individual/id"}
_IMAGE = {**_INDIVIDUAL, "image_id": "$response.body#/images/0/image_id"}
ENROLL_LINKS: dict[str, tuple[str, str, dict[str, str]]] = {
    "GetIndividual": ("get", "/individuals/{individual_id}", _INDIVIDUAL),
    "UpdateIndividual": ("patch", "/individuals/{individual_id}", _INDIVIDUAL),
    "DeleteIndividual": ("delete", "/individuals/{individual_id}", _INDIVIDUAL),
    "MergeIntoIndividual": ("post", "/individuals/{individual_id}/merge", _INDIVIDUAL),
    "ListImages": ("get", "/individuals/{individual_id}/images", _INDIVIDUAL),
    "GetImage": ("get", "/individuals/{individual_id}/images/{image_id}", _IMAGE),
    "GetImageFile": ("get", "/individuals/{individual_id}/images/{image_id}/file", _IMAGE),
    "DeleteImage": ("delete", "/individuals/{individual_id}/images/{image_id}", _IMAGE),
}


def error_responses(
    *statuses: int, extra: dict[int | str, dict[str, Any]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the listed error statuses with the error body, plus ``extra``."""
    out: dict[int | str, dict[str, Any]] = dict(extra or {})
    for status in statuses:
        code, message = ERROR_EXAMPLES[status]
        out[status] = {
            "model": ErrorBody,
            "description": f"JSON error body, e.g. code `{code}`",
            "content": {"application/json": {"example": {"code": code, "message": message, "details": {}}}},
        }
    return out


def _error(status: int) -> dict[str, Any]:
    code, message = ERROR_EXAMPLES[status]
    out: dict[str, Any] = {
        "description": f"JSON error body, e.g. code `{code}`",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorBody"},
                "example": {"code": code, "message": message, "details": {}},
            }
        },
    }
    if status in (429, 503):
        out["headers"] = RETRY_AFTER
    return out


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """Document what every operation can answer besides its own statuses: with a key, 401, 403 and
    429 (too many failed key checks); with a JSON body, 400 ``malformed_body``; with the database,
    503 ``database_unavailable`` with Retry-After; and the enroll answer's links to the operations
    that take its ids."""
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            common = [401, 403, 429] if operation.get("security") else []
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                common.append(400)
            if (method, path) not in NO_DATABASE:
                common.append(503)
            for status in common:
                if str(status) in responses:
                    if status in (429, 503):
                        responses[str(status)].setdefault("headers", RETRY_AFTER)
                    continue
                responses[str(status)] = _error(status)
    links = {
        name: {"operationId": spec["paths"][path][method]["operationId"], "parameters": parameters}
        for name, (method, path, parameters) in ENROLL_LINKS.items()
        if method in spec.get("paths", {}).get(path, {})
    }
    enroll = spec.get("paths", {}).get("/enroll", {}).get("post")
    if enroll is not None:
        for success in ("200", "201"):
            enroll["responses"][success]["links"] = links
    return spec


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


def _form_value(schema: dict[str, Any]) -> dict[str, Any]:
    """A form field is a string or absent, never JSON null: an optional field left unset is left
    out of the form, so the multipart schema does not offer null (its JSON twin does)."""
    options = schema.get("anyOf")
    if not options or {"type": "null"} not in options:
        return schema
    rest = [option for option in options if option != {"type": "null"}]
    out = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
    return {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **out}


def image_body(
    fields: type[BaseModel],
    json_model: type[BaseModel],
    file_fields: dict[str, tuple[bool, bool, str]],
) -> dict[str, Any]:
    """``openapi_extra`` for a body taking ``fields`` plus files (name -> (required, many, description))."""
    form = _inline(fields)
    properties = {name: _form_value(schema) for name, schema in form.get("properties", {}).items()}
    required = list(form.get("required", []))
    for name, (is_required, many, description) in file_fields.items():
        binary = {"type": "string", "format": "binary"}
        properties[name] = (
            {
                "type": "array",
                "items": binary,
                "description": description,
                "minItems": 1 if is_required else 0,
            }
            if many
            else {**binary, "description": description}
        )
        if is_required:
            required.append(name)
    if "metadata" in properties:
        properties["metadata"] = {"type": "string", "description": 'JSON object, e.g. {"breed": "beagle"}'}
    json_schema = _inline(json_model)
    examples = json_schema.pop("examples", [])
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    # Like the JSON body, the form takes no other fields (the services refuse them).
                    "schema": {
                        "type": "object",
                        "properties": properties,
                        "required": required,
                        "additionalProperties": False,
                    },
                },
                "application/json": {
                    "schema": json_schema,
                    "examples": {f"example{i + 1}": {"value": value} for i, value in enumerate(examples)},
                },
            },
        }
    }
