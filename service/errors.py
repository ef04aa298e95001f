"""Domain exceptions and the one place that maps them to HTTP: a JSON body with a stable ``code``.

Services raise these; routes never build error responses themselves. Every error the API returns,
including validation errors, unknown routes and unexpected failures, has the body
``{"code": "...", "message": "...", "details": {...}}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db.health import UNAVAILABLE, is_conflict

log = logging.getLogger(__name__)


class ConfigurationError(RuntimeError):
    """The settings cannot work (raised at start-up, never mapped to a response)."""


class ServiceError(Exception):
    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class MalformedBody(ServiceError):
    status_code = 400
    code = "malformed_body"


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class SpeciesNotFound(ServiceError):
    status_code = 404
    code = "species_not_found"


class SpeciesUnavailable(ServiceError):
    """The species is known but has no serving model (corrupt artifact, or first index being built)."""

    status_code = 503
    code = "species_unavailable"


class IndividualNotFound(ServiceError):
    status_code = 404
    code = "individual_not_found"


class ImageNotFound(ServiceError):
    status_code = 404
    code = "image_not_found"


class SpeciesMismatch(ServiceError):
    status_code = 409
    code = "species_mismatch"


class ExternalIdConflict(ServiceError):
    status_code = 409
    code = "external_id_conflict"


class ReviewNotFound(ServiceError):
    status_code = 404
    code = "review_not_found"


class ReviewAlreadyResolved(ServiceError):
    status_code = 409
    code = "review_already_resolved"


class ReviewInProgress(ServiceError):
    """Another request (through another API process) is resolving the same review item."""

    status_code = 409
    code = "review_in_progress"


class IndexUpdateFailed(ServiceError):
    """The request's rows are committed but the search index could not take their vectors."""

    status_code = 503
    code = "index_update_failed"


class ImageRejected(ServiceError):
    """Base of every refusal of an uploaded image."""

    status_code = 422
    code = "image_rejected"


class UnsupportedMediaType(ImageRejected):
    status_code = 415
    code = "unsupported_media_type"


class ImageUnreadable(ImageRejected):
    status_code = 422
    code = "image_unreadable"


class ImageTooLarge(ImageRejected):
    """Too many pixels (decompression-bomb guard)."""

    status_code = 413
    code = "image_too_large"


class PixelBudgetExceeded(ImageRejected):
    """The images of one request have more pixels together than one request may decode."""

    status_code = 413
    code = "pixel_budget_exceeded"


class ImageUninformative(ImageRejected):
    """Too small, or nearly one flat colour: nothing in it to recognise an animal by."""

    status_code = 422
    code = "image_uninformative"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class JobNotFound(ServiceError):
    status_code = 404
    code = "job_not_found"


class JobConflict(ServiceError):
    """A job of that kind is already queued or running for the species, or the job has ended."""

    status_code = 409
    code = "job_conflict"


class TooManyFailedAttempts(ServiceError):
    """Too many failed API key checks from one client address; ``retry_after`` in seconds."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


HTTP_CODES = {
    400: "malformed_body",  # FastAPI's answer to a JSON body it cannot parse
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": jsonable_encoder(details or {})}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "ApiKey"} if status == 401 else None
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    response = error_response(exc.status_code, exc.code, exc.message, exc.details)
    if isinstance(exc, TooManyFailedAttempts):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    return error_response(422, "validation_error", "the request is not valid", {"errors": errors})


def allowed_methods(request: Request) -> list[str]:
    """Every method the API documents at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        parts = re.split(r"(\{[^/]+?\})", template)
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
        if re.fullmatch(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    response = error_response(exc.status_code, code, str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    if exc.status_code == 405:
        response.headers["Allow"] = ", ".join(allowed_methods(request))
    return response


async def _concurrent_change(request: Request, exc: Exception) -> JSONResponse:
    # Another request (through another API process: each process serialises its own writes) changed
    # the same rows at the same moment, and the database refused this one: a unique key taken, a
    # row deleted under it, a deadlock. Its transaction was rolled back; sent again, it sees the
    # other's result.
    log.warning("concurrent change on %s %s: %s", request.method, request.url.path, getattr(exc, "orig", exc))
    return error_response(
        409,
        "concurrent_change",
        "another request changed the same records at the same moment; nothing of this one was written, "
        "send it again",
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    if is_conflict(exc):
        return await _concurrent_change(request, exc)
    # Logged once per outage by service.db.health, not once per request.
    log.debug("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    retry = request.app.state.settings.database_retry_after_seconds
    response = error_response(
        503,
        "database_unavailable",
        "the database cannot be reached; retry later",
        {"retry_after": retry},
    )
    response.headers["Retry-After"] = str(retry)
    return response


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # A safety net: schemas refuse what the database cannot store (NUL, NaN), so this means a value
    # slipped past them. The database refused it and nothing was written; the client can fix it.
    assert isinstance(exc, DataError)
    log.warning("the database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
    return error_response(422, "unstorable_value", "the database cannot store a value in this request")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(IntegrityError, _concurrent_change)
    for unavailable in UNAVAILABLE:
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected_error)
