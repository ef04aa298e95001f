"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import AdminPrincipal, ReadPrincipal, RuntimeDep
from service.api.openapi import error_responses
from service.schemas import HealthResult, ReadyResult, StatusResult
from service.services import species

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=HealthResult,
    summary="Liveness",
    description="200 while the process serves HTTP. No API key needed.",
)
async def health() -> HealthResult:
    return HealthResult(status="ok")


@router.get(
    "/ready",
    response_model=ReadyResult,
    summary="Readiness",
    description=(
        "200 when the database answers, at least one species serves, no species is waiting for its first "
        "index, and every serving index holds exactly the database's vectors; 503 with the same body "
        "otherwise. The body says only which check is down; `GET /status` (admin scope) and the log say "
        "why. Disabled species do not make the service unready. No API key needed."
    ),
    responses={503: {"model": ReadyResult, "description": "Not ready; the body says which check failed"}},
)
def ready(runtime: RuntimeDep, response: Response) -> ReadyResult:
    result = species.readiness(runtime.sessions, runtime.registry)
    if not result.ready:
        response.status_code = 503
    return result.probe()


@router.get(
    "/status",
    response_model=StatusResult,
    summary="Readiness with its reasons",
    description=(
        "What `/ready` checks, with the error behind each failed check: the database driver's message, "
        "each species' status, reason and underlying error (file paths included), index and database "
        "counts. Always 200. Needs the admin scope."
    ),
    responses=error_responses(401, 403),
)
def status(principal: AdminPrincipal, runtime: RuntimeDep) -> StatusResult:
    return species.readiness(runtime.sessions, runtime.registry)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "Requests and latency per route, inference and search time per species, index sizes. Needs the read "
        "scope (Prometheus sends it with `http_headers` or `authorization`)."
    ),
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": 'animalid_index_vectors{species="dog"} 1250.0\n'
                    'animalid_http_requests_total{method="POST",route="/identify",status="200"} 42.0\n'
                }
            }
        },
        **error_responses(401, 403),
    },
)
def metrics(principal: ReadPrincipal, runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
