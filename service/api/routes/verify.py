"""``POST /verify``: is this the same animal as an enrolled individual, or as another photo?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api.deps import ReadPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses, image_body
from service.api.payload import files, read_payload, reject_unknown_files, validate
from service.ml.images import decode_base64
from service.schemas import VerifyFields, VerifyJSON, VerifyResult
from service.services import identification

router = APIRouter(tags=["verify"])


@dataclass(frozen=True)
class VerifyInput:
    fields: VerifyFields
    image: bytes
    reference_image: bytes | None


async def verify_input(request: Request) -> VerifyInput:
    payload = await read_payload(request, max_files=2)
    if payload.kind == "json":
        body = validate(VerifyJSON, payload.fields)
        reference = (
            decode_base64(body.reference_image, field="reference_image")
            if body.reference_image is not None
            else None
        )
        return VerifyInput(fields=body, image=decode_base64(body.image), reference_image=reference)
    reject_unknown_files(payload, {"image", "reference_image"})
    fields = validate(VerifyFields, payload.fields)
    reference_files = files(payload, "reference_image", required=False)
    return VerifyInput(
        fields=fields,
        image=files(payload, "image")[0],
        reference_image=reference_files[0] if reference_files else None,
    )


@router.post(
    "/verify",
    response_model=VerifyResult,
    summary="Verify a photo against an individual or another photo",
    description=(
        "Give `individual_id` to compare with every enrolled image of that individual (the similarity is the "
        "maximum, and `best_image_id` names the image), or `reference_image` to compare two photos. "
        "Exactly one of the two. Needs the read scope."
    ),
    openapi_extra=image_body(
        VerifyFields,
        VerifyJSON,
        {
            "image": (True, False, "The photo to verify"),
            "reference_image": (False, False, "A photo to compare with, instead of individual_id"),
        },
    ),
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
def verify(
    principal: ReadPrincipal,
    body: Annotated[VerifyInput, Depends(verify_input)],
    session: SessionDep,
    runtime: RuntimeDep,
) -> VerifyResult:
    fields = body.fields
    return identification.verify(
        session,
        runtime.registry,
        runtime.metrics,
        runtime.limits,
        fields.species,
        body.image,
        fields.individual_id,
        body.reference_image,
        fields.threshold,
        fields.include_timings,
    )
