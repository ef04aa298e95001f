"""``POST /explain``: heat maps of what made a photo and its reference similar, as a picture."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from service.api.deps import ReadPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses, image_body
from service.api.payload import ImagePair, read_image_pair
from service.schemas import ExplainFields, ExplainJSON, ExplainResult
from service.services import explanation

router = APIRouter(tags=["explain"])


ExplainInput = ImagePair[ExplainFields]


async def explain_input(request: Request) -> ExplainInput:
    return await read_image_pair(request, ExplainFields, ExplainJSON)


@router.post(
    "/explain",
    summary="Explain a match with heat maps over both photos",
    description=(
        "Heat maps (gradient x input, per pixel) of the cosine similarity between the photo and a "
        "reference: `individual_id` (its enrolled image that matches best) or `reference_image`. Returns "
        "a PNG with the photo and the reference side by side, each with its heat map over it (blurred for "
        "the eye), the similarity and the individual written above and a colour key below; with "
        "`format=json`, both raw maps at the model's input resolution plus the PNG in base64. Headers "
        "`X-Similarity` and `X-Reference-Image-Id` accompany the PNG. "
        "Needs the read scope."
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
                "description": "The picture as a PNG (default) or, with format=json, the raw maps",
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
        Query(description="png: the picture; json: raw maps and the PNG", examples=["png"]),
    ] = "png",
) -> Response | ExplainResult:
    result = explanation.explain(
        session,
        runtime.registry,
        runtime.store,
        runtime.metrics,
        runtime.images,
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
