"""Request bodies that carry images: ``multipart/form-data`` (files) or JSON (base64 strings).

Routes declare a dependency that turns either form into the same typed input, so the services
never see the transport. Both forms are documented in OpenAPI by :mod:`service.api.openapi`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.errors import InvalidRequest, MalformedBody, UnsupportedMediaType
from service.ml.images import decode_base64

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=BaseModel)

MAX_FORM_FIELDS = 32
# How Starlette's form parser words its max_files refusal (it raises the same HTTP 400 for every
# malformed form; tests/service/test_enroll.py notices if the wording changes).
STARLETTE_TOO_MANY_FILES = "Too many files."


@dataclass
class Payload:
    kind: Literal["json", "multipart"]
    fields: dict[str, Any] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


def parse_json(raw: str | bytes, what: str) -> Any:
    """Parse JSON from a client. Nesting deep enough to exhaust Python's recursion limit in the
    parser is a malformed body like any other, not a server error."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"{what} is not valid JSON") from exc
    except RecursionError as exc:
        raise MalformedBody(f"{what} is nested too deeply") from exc


async def read_payload(request: Request, max_files: int) -> Payload:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_files)
    if content_type == "application/json":
        body = parse_json(await request.body(), "the body")
        if not isinstance(body, dict):
            raise InvalidRequest("the JSON body must be an object")
        return Payload(kind="json", fields=body)
    raise UnsupportedMediaType(
        "send multipart/form-data or application/json", content_type=content_type or None
    )


async def _read_multipart(request: Request, max_files: int) -> Payload:
    payload = Payload(kind="multipart")
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except HTTPException as exc:  # Starlette's answer to a malformed form or too many parts
        if str(exc.detail).startswith(STARLETTE_TOO_MANY_FILES):
            # Too many images is a rule of the request, as in JSON (the services' 422), not a broken body.
            raise InvalidRequest(
                f"too many files: at most {max_files} per request", max_files=max_files
            ) from exc
        raise MalformedBody(f"malformed multipart body: {exc.detail}") from exc
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                payload.files.setdefault(name, []).append(await value.read())
            elif name in payload.fields:
                raise InvalidRequest(f"field {name!r} is given more than once", field=name)
            else:
                payload.fields[name] = value
    finally:
        await form.close()
    return payload


def validate(model: type[M], data: dict[str, Any]) -> M:
    """Validate like FastAPI would, so the error body is the usual ``validation_error``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from exc


def json_field(payload: Payload, name: str) -> None:
    """Multipart carries JSON objects (e.g. metadata) as strings: parse one in place."""
    raw = payload.fields.get(name)
    if isinstance(raw, str):
        try:
            payload.fields[name] = parse_json(raw, f"field {name!r}") if raw.strip() else None
        except MalformedBody as exc:
            if isinstance(exc.__cause__, RecursionError):
                raise
            # A field that is not JSON is a wrong value in a well-formed form, as before.
            raise InvalidRequest(f"field {name!r} must be a JSON object", field=name) from exc


def files(payload: Payload, name: str, required: bool = True, single: bool = True) -> list[bytes]:
    """The uploaded files of one multipart field."""
    if name in payload.fields:
        raise InvalidRequest(f"field {name!r} must be a file upload", field=name)
    found = payload.files.get(name, [])
    if required and not found:
        raise InvalidRequest(f"file field {name!r} is required", field=name)
    if single and len(found) > 1:
        raise InvalidRequest(f"send one file in {name!r}", field=name)
    return found


def reject_unknown_files(payload: Payload, allowed: set[str]) -> None:
    unknown = sorted(set(payload.files) - allowed)
    if unknown:
        raise InvalidRequest(f"unexpected file fields {unknown}", allowed=sorted(allowed))


@dataclass(frozen=True)
class ImagePair(Generic[F]):
    """A photo, an optional reference photo and the other fields (verify and explain)."""

    fields: F
    image: bytes
    reference_image: bytes | None


async def read_image_pair(request: Request, fields_model: type[F], json_model: type[F]) -> ImagePair[F]:
    """``image`` and optional ``reference_image``: multipart files or base64 strings in JSON."""
    payload = await read_payload(request, max_files=2)
    if payload.kind == "json":
        body = validate(json_model, payload.fields)
        encoded = body.model_dump(include={"image", "reference_image"})
        reference = encoded.get("reference_image")
        return ImagePair(
            fields=body,
            image=decode_base64(encoded["image"]),
            reference_image=None if reference is None else decode_base64(reference, field="reference_image"),
        )
    reject_unknown_files(payload, {"image", "reference_image"})
    fields = validate(fields_model, payload.fields)
    reference_files = files(payload, "reference_image", required=False)
    return ImagePair(
        fields=fields,
        image=files(payload, "image")[0],
        reference_image=reference_files[0] if reference_files else None,
    )
