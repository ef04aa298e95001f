"""A Python client of the AnimalID REST API, over httpx.

    with AnimalIDClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.identify("dog", Path("photo.jpg"))
        print(result.decision, result.best)

Answers are the API's own schemas (``service.schemas``); an error answer raises :class:`ApiError`
with the API's machine-readable ``code``, and an unreachable server :class:`ServerUnreachable`.
``transport`` lets a caller (or a test) send the requests elsewhere than the network, e.g.
``httpx.ASGITransport`` or a ``TestClient``'s transport.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from service.schemas import (
    EnrollResult,
    IdentifyResult,
    ImagesPublic,
    IndividualPublic,
    IndividualsPublic,
    SpeciesList,
)

Model = TypeVar("Model", bound=BaseModel)

PAGE_SIZE = 500  # the API's largest page


class ClientError(Exception):
    """A request did not get the answer it needed; the message is one line for a person."""


class ServerUnreachable(ClientError):
    pass


class ApiError(ClientError):
    """The API answered with an error body ``{"code", "message", "details"}``."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


ImageInput = Path | tuple[str, bytes]


def _file(image: ImageInput) -> tuple[str, bytes]:
    if isinstance(image, Path):
        return image.name, image.read_bytes()
    return image


class AnimalIDClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> AnimalIDClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- requests -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, schema: type[Model], **kwargs: Any) -> Model:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach the API at {self._http.base_url}: {exc}") from exc
        if response.is_error:
            raise _api_error(response)
        try:
            return schema.model_validate(response.json())
        except (ValueError, ValidationError) as exc:  # not JSON, or not this API's answer
            raise ClientError(f"{method} {response.url} did not answer as the AnimalID API does") from exc

    def species(self) -> SpeciesList:
        return self._request("GET", "/species", SpeciesList)

    def enroll(
        self,
        species: str,
        images: Sequence[ImageInput],
        *,
        external_id: str | None = None,
        name: str | None = None,
        individual_id: uuid.UUID | None = None,
    ) -> EnrollResult:
        """Add photos to an individual, created on first use of ``external_id``. Idempotent: a photo
        the individual already has comes back with ``created=False``."""
        fields = {
            "species": species,
            "external_id": external_id,
            "name": name,
            "individual_id": individual_id,
        }
        data = {key: str(value) for key, value in fields.items() if value is not None}
        files = [("images", _file(image)) for image in images]
        return self._request("POST", "/enroll", EnrollResult, data=data, files=files)

    def identify(self, species: str, image: ImageInput, *, top_k: int | None = None) -> IdentifyResult:
        data = {"species": species} | ({"top_k": str(top_k)} if top_k is not None else {})
        return self._request("POST", "/identify", IdentifyResult, data=data, files={"image": _file(image)})

    def find_individual(self, species: str, external_id: str) -> IndividualPublic | None:
        page = self._request(
            "GET", "/individuals", IndividualsPublic, params={"species": species, "external_id": external_id}
        )
        return page.data[0] if page.data else None

    def image_hashes(self, individual_id: uuid.UUID) -> set[str]:
        """SHA-256 of every image an individual has (all pages)."""
        return {image.sha256 for image in self._images(individual_id)}

    def _images(self, individual_id: uuid.UUID) -> Iterator[Any]:
        offset = 0
        while True:
            page = self._request(
                "GET",
                f"/individuals/{individual_id}/images",
                ImagesPublic,
                params={"offset": offset, "limit": PAGE_SIZE},
            )
            yield from page.data
            offset += len(page.data)
            if not page.data or offset >= page.count:
                return


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        return ApiError(
            response.status_code, str(body["code"]), str(body.get("message", "")), body.get("details")
        )
    text = response.text.strip().splitlines()
    return ApiError(response.status_code, "http_error", text[0] if text else response.reason_phrase)
