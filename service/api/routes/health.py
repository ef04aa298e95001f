"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import ReadPrincipal, RuntimeDep
from service.schemas import HealthResult, ReadyResult
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
        "otherwise. Disabled species are listed with their reason but do not make the service unready. "
        "No API key needed."
    ),
    responses={503: {"model": ReadyResult, "description": "Not ready; the body says why"}},
)
def ready(runtime: RuntimeDep, response: Response) -> ReadyResult:
    result = species.readiness(runtime.sessions, runtime.registry)
    if not result.ready:
        response.status_code = 503
    return result


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
        }
    },
)
def metrics(principal: ReadPrincipal, runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
