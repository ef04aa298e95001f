"""``POST /identify``: which enrolled individual is this, or ``unknown``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api.deps import ReadPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses, image_body
from service.api.payload import files, read_payload, reject_unknown_files, validate
from service.ml.images import decode_base64
from service.schemas import IdentifyFields, IdentifyJSON, IdentifyResult
from service.services import identification

router = APIRouter(tags=["identify"])


@dataclass(frozen=True)
class IdentifyInput:
    fields: IdentifyFields
    image: bytes


async def identify_input(request: Request) -> IdentifyInput:
    payload = await read_payload(request, max_files=1)
    if payload.kind == "json":
        body = validate(IdentifyJSON, payload.fields)
        return IdentifyInput(fields=body, image=decode_base64(body.image))
    reject_unknown_files(payload, {"image"})
    return IdentifyInput(fields=validate(IdentifyFields, payload.fields), image=files(payload, "image")[0])


@router.post(
    "/identify",
    response_model=IdentifyResult,
    summary="Identify the individual in a photo",
    description=(
        "Searches the species' gallery and returns up to `top_k` individuals, best first, each once, "
        "with the "
        "similarity of its best-matching enrolled image. `decision` is `match` when the best similarity "
        "reaches the threshold and `unknown` otherwise: an animal nobody enrolled is not forced onto its "
        "nearest neighbour. The threshold is the request's, else the one the model card's open-set table "
        "gives for the gallery's size and the species' target FPIR (share of never-enrolled animals "
        "answered `match`), else the card's pair threshold, else the configured default; `reason` says "
        "which. With the table, answers between the review threshold and the threshold are `uncertain`, "
        "and `confidence` is the calibrated probability that the best candidate is right, for the "
        "configured share of queries of animals not enrolled. "
        "`include_timings=true` adds decode, embed and search times. Needs the read scope."
    ),
    openapi_extra=image_body(IdentifyFields, IdentifyJSON, {"image": (True, False, "The photo to identify")}),
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
)
def identify(
    principal: ReadPrincipal,
    body: Annotated[IdentifyInput, Depends(identify_input)],
    session: SessionDep,
    runtime: RuntimeDep,
) -> IdentifyResult:
    fields = body.fields
    return identification.identify(
        session,
        runtime.registry,
        runtime.metrics,
        runtime.limits,
        fields.species,
        body.image,
        fields.top_k,
        fields.threshold,
        fields.include_timings,
        review_store=runtime.store if runtime.settings.review_queue else None,
    )
