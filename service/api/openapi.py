"""OpenAPI helpers: request bodies offered as multipart and as JSON, and the error responses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.schemas import ErrorBody
from training.preprocess import FORMATS_TEXT

ERROR_EXAMPLES = {
    400: ("bad_request", "malformed request"),
    401: ("unauthorized", "missing API key: send it in the x-api-key header"),
    403: ("forbidden", "this API key has the read scope; admin is needed"),
    404: ("species_not_found", "unknown species 'wolf'"),
    409: ("species_mismatch", "individual 0b6f... is not a dog"),
    413: ("payload_too_large", "the request body exceeds 10485760 bytes"),
    415: ("unsupported_media_type", f"image is not a {FORMATS_TEXT} image"),
    422: ("image_unreadable", "image could not be decoded as JPEG"),
    503: ("species_unavailable", "species 'cat' is not serving: the artifact is corrupt"),
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


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


def image_body(
    fields: type[BaseModel],
    json_model: type[BaseModel],
    file_fields: dict[str, tuple[bool, bool, str]],
) -> dict[str, Any]:
    """``openapi_extra`` for a body taking ``fields`` plus files (name -> (required, many, description))."""
    form = _inline(fields)
    properties = dict(form.get("properties", {}))
    required = list(form.get("required", []))
    for name, (is_required, many, description) in file_fields.items():
        binary = {"type": "string", "format": "binary"}
        properties[name] = (
            {"type": "array", "items": binary, "description": description}
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
                    "schema": {"type": "object", "properties": properties, "required": required},
                },
                "application/json": {
                    "schema": json_schema,
                    "examples": {f"example{i + 1}": {"value": value} for i, value in enumerate(examples)},
                },
            },
        }
    }
