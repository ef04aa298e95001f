"""``Annotated`` dependencies the routes declare: runtime pieces, a session, the caller's principal."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from service.errors import Forbidden, ServiceError, TooManyFailedAttempts, Unauthorized
from service.ml.registry import Registry
from service.runtime import Runtime
from service.security import ANONYMOUS_ADMIN, Principal, Scope
from service.services import audit

API_KEY_HEADER = "x-api-key"

log = logging.getLogger(__name__)

api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="A key with the read scope (identify, verify, explain, list) or the admin scope (everything)",
)


# Trivial dependencies are ``async``: FastAPI would run a plain ``def`` one in the thread pool,
# one thread hop per dependency per request.


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_session(runtime: RuntimeDep) -> AsyncIterator[Session]:
    """A session for the request. Opening one does no I/O. Closing one that still holds a
    connection returns it to the pool, which is database I/O, so that runs in the thread pool; a
    session whose work ended with a commit or rollback holds none (identify ends its read before
    answering) and closes here, two thread hops fewer per request."""
    session = runtime.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):  # a client gone away must not leak the connection
                await anyio.to_thread.run_sync(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_registry(runtime: RuntimeDep) -> Registry:
    return runtime.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def _check(runtime: Runtime, key: str | None, needed: Scope) -> Principal:
    if not key:
        raise Unauthorized(f"missing API key: send it in the {API_KEY_HEADER} header", reason="missing_key")
    principal = runtime.settings.keyring.authenticate(key)
    if principal is None:
        raise Unauthorized("invalid API key", reason="invalid_key")
    if not principal.scope.allows(needed):
        raise Forbidden(
            f"this API key has the {principal.scope.value} scope; {needed.value} is needed",
            reason="scope",
            fingerprint=principal.fingerprint,
        )
    return principal


async def _authenticate(request: Request, runtime: Runtime, key: str | None, needed: Scope) -> Principal:
    """The caller's principal. A refusal (401, 403) is audited; failed checks from one client address
    beyond the configured rate are answered 429 with Retry-After, without checking the key."""
    if runtime.settings.auth_disabled:
        return ANONYMOUS_ADMIN
    client = request.client.host if request.client else "unknown"
    wait = runtime.auth_failures.wait(client)
    if wait:
        raise TooManyFailedAttempts(
            f"too many failed API key checks from this address; retry in {wait} s", retry_after=wait
        )
    try:
        return _check(runtime, key, needed)
    except (Unauthorized, Forbidden) as refused:
        await _refused(request, runtime, client, refused)
        raise


async def _refused(request: Request, runtime: Runtime, client: str, refused: ServiceError) -> None:
    if isinstance(refused, Unauthorized) and runtime.auth_failures.failed(client):
        log.warning(
            "%d failed API key checks from %s within %d s: it waits before its keys are checked again",
            runtime.auth_failures.limit,
            client,
            runtime.auth_failures.window,
        )
    await anyio.to_thread.run_sync(
        audit.record_refusal,
        runtime.sessions,
        refused.details.get("fingerprint"),
        client,
        request.method,
        request.url.path,
        refused.status_code,
        refused.details["reason"],
    )


ApiKey = Annotated[str | None, Security(api_key_header)]


async def require_read(request: Request, runtime: RuntimeDep, key: ApiKey) -> Principal:
    return await _authenticate(request, runtime, key, Scope.READ)


async def require_admin(request: Request, runtime: RuntimeDep, key: ApiKey) -> Principal:
    return await _authenticate(request, runtime, key, Scope.ADMIN)


# Declare these first in a route's signature: the key is checked before any body is parsed.
ReadPrincipal = Annotated[Principal, Depends(require_read)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
