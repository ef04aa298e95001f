"""``POST /explain``: a Grad-CAM heatmap of what made a photo similar to a reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from service.api.deps import ReadPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses, image_body
from service.api.payload import files, read_payload, reject_unknown_files, validate
from service.ml.images import decode_base64
from service.schemas import ExplainFields, ExplainJSON, ExplainResult
from service.services import explanation

router = APIRouter(tags=["explain"])


@dataclass(frozen=True)
class ExplainInput:
    fields: ExplainFields
    image: bytes
    reference_image: bytes | None


async def explain_input(request: Request) -> ExplainInput:
    payload = await read_payload(request, max_files=2)
    if payload.kind == "json":
        body = validate(ExplainJSON, payload.fields)
        reference = (
            decode_base64(body.reference_image, field="reference_image")
            if body.reference_image is not None
            else None
        )
        return ExplainInput(fields=body, image=decode_base64(body.image), reference_image=reference)
    reject_unknown_files(payload, {"image", "reference_image"})
    reference_files = files(payload, "reference_image", required=False)
    return ExplainInput(
        fields=validate(ExplainFields, payload.fields),
        image=files(payload, "image")[0],
        reference_image=reference_files[0] if reference_files else None,
    )


@router.post(
    "/explain",
    summary="Explain a match with a Grad-CAM heatmap",
    description=(
        "Grad-CAM of the cosine similarity between the photo and a reference: `individual_id` (its enrolled "
        "image that matches best) or `reference_image`. Returns the heatmap over the photo as a PNG, or with "
        "`format=json` the raw map at the model's input resolution plus the PNG in base64. Headers "
        "`X-Similarity` and `X-Reference-Image-Id` accompany the PNG. Needs the read scope."
    ),
    openapi_extra=image_body(
        ExplainFields,
        ExplainJSON,
        {
            "image": (True, False, "The photo to explain"),
            "reference_image": (False, False, "A photo to compare with, instead of individual_id"),
        },
    ),
    response_model=ExplainResult,
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
            200: {
                "description": "The overlay PNG (default) or, with format=json, the raw map",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    ),
)
def explain(
    principal: ReadPrincipal,
    body: Annotated[ExplainInput, Depends(explain_input)],
    session: SessionDep,
    runtime: RuntimeDep,
    format: Annotated[
        Literal["png", "json"],
        Query(description="png: the overlay image; json: raw map and PNG", examples=["png"]),
    ] = "png",
) -> Response | ExplainResult:
    result = explanation.explain(
        session,
        runtime.registry,
        runtime.metrics,
        runtime.settings.max_image_pixels,
        runtime.settings.explain_max_side,
        body.fields.species,
        body.image,
        body.fields.individual_id,
        body.reference_image,
    )
    if format == "json":
        return result.to_result()
    headers = {"X-Similarity": f"{result.similarity:.6f}", "X-Model-Version": result.model_version}
    if result.reference_image_id is not None:
        headers["X-Reference-Image-Id"] = str(result.reference_image_id)
    return Response(content=result.overlay_png, media_type="image/png", headers=headers)
