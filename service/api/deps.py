"""``Annotated`` dependencies the routes declare: runtime pieces, a session, the caller's principal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from service.errors import Forbidden, Unauthorized
from service.ml.registry import Registry
from service.runtime import Runtime
from service.security import ANONYMOUS_ADMIN, Principal, Scope

API_KEY_HEADER = "x-api-key"

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


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    # Sync on purpose: closing a session returns its connection to the pool, which is database I/O.
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_registry(runtime: RuntimeDep) -> Registry:
    return runtime.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def _authenticate(runtime: Runtime, key: str | None, needed: Scope) -> Principal:
    if runtime.settings.auth_disabled:
        return ANONYMOUS_ADMIN
    if not key:
        raise Unauthorized(f"missing API key: send it in the {API_KEY_HEADER} header")
    principal = runtime.settings.keyring.authenticate(key)
    if principal is None:
        raise Unauthorized("invalid API key")
    if not principal.scope.allows(needed):
        raise Forbidden(f"this API key has the {principal.scope.value} scope; {needed.value} is needed")
    return principal


ApiKey = Annotated[str | None, Security(api_key_header)]


async def require_read(runtime: RuntimeDep, key: ApiKey) -> Principal:
    return _authenticate(runtime, key, Scope.READ)


async def require_admin(runtime: RuntimeDep, key: ApiKey) -> Principal:
    return _authenticate(runtime, key, Scope.ADMIN)


# Declare these first in a route's signature: the key is checked before any body is parsed.
ReadPrincipal = Annotated[Principal, Depends(require_read)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
