"""``POST /enroll``: add images of one individual (created on first use of its external id)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from service.api.deps import AdminPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses, image_body
from service.api.payload import files, json_field, read_payload, reject_unknown_files, validate
from service.ml.images import decode_base64
from service.schemas import EnrollFields, EnrollJSON, EnrollResult
from service.services import enrollment
from service.services.enrollment import EnrollCommand
from training.preprocess import FORMATS_TEXT

router = APIRouter(tags=["enroll"])


async def enroll_command(request: Request, runtime: RuntimeDep) -> EnrollCommand:
    payload = await read_payload(request, max_files=runtime.settings.max_images_per_request)
    if payload.kind == "json":
        body = validate(EnrollJSON, payload.fields)
        images = [decode_base64(item, field=f"images[{i}]") for i, item in enumerate(body.images)]
        fields: EnrollFields = body
    else:
        reject_unknown_files(payload, {"images"})
        json_field(payload, "metadata")
        fields = validate(EnrollFields, payload.fields)
        images = files(payload, "images", single=False)
    return EnrollCommand(
        species=fields.species,
        images=images,
        individual_id=fields.individual_id,
        external_id=fields.external_id,
        name=fields.name,
        metadata=fields.metadata,
    )


@router.post(
    "/enroll",
    response_model=EnrollResult,
    status_code=status.HTTP_201_CREATED,
    summary="Enroll images of an individual",
    description=(
        "Adds one or more images of one individual, embedded in one batch. Name the individual by "
        "`individual_id` (existing) or `external_id` (found, or created with `name` and `metadata`). "
        "Re-sending an image the individual already has is idempotent: nothing changes, the image is "
        "reported with `created: false` and the status is 200 instead of 201. The answer comes after the "
        "database commit, and the individual is identifiable as soon as it arrives; a 503 "
        "`index_update_failed` means the images are stored but not yet searchable, and sending the same "
        "request again indexes them. Needs the admin scope."
    ),
    openapi_extra=image_body(
        EnrollFields, EnrollJSON, {"images": (True, True, f"One or more {FORMATS_TEXT} images")}
    ),
    responses=error_responses(
        400,
        401,
        403,
        404,
        409,
        413,
        415,
        422,
        503,
        extra={
            200: {"model": EnrollResult, "description": "Every image was already enrolled (idempotent retry)"}
        },
    ),
)
def enroll(
    principal: AdminPrincipal,
    command: Annotated[EnrollCommand, Depends(enroll_command)],
    session: SessionDep,
    runtime: RuntimeDep,
    response: Response,
) -> EnrollResult:
    outcome = enrollment.enroll(
        session,
        runtime.registry,
        runtime.store,
        runtime.metrics,
        runtime.images,
        runtime.settings.max_images_per_request,
        command,
        principal,
    )
    if not outcome.created_anything:
        response.status_code = status.HTTP_200_OK
    return outcome.result
