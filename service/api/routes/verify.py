"""``POST /verify``: is this the same animal as an enrolled individual, or as another photo?"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api.deps import ReadPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses, image_body
from service.api.payload import ImagePair, read_image_pair
from service.schemas import VerifyFields, VerifyJSON, VerifyResult
from service.services import identification

router = APIRouter(tags=["verify"])


VerifyInput = ImagePair[VerifyFields]


async def verify_input(request: Request) -> VerifyInput:
    return await read_image_pair(request, VerifyFields, VerifyJSON)


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
