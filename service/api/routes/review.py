"""``/review``: identify answers marked uncertain, kept for an admin to resolve (opt-in queue)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from service.api.deps import AdminPrincipal, RegistryDep, RuntimeDep, SessionDep
from service.api.openapi import error_responses
from service.api.routes.individuals import PageDep
from service.schemas import EXAMPLE_UUID, ReviewItemPublic, ReviewItemsPublic, ReviewResolve, ReviewStatusName
from service.services import review

router = APIRouter(prefix="/review", tags=["review"])

ReviewIdPath = Annotated[uuid.UUID, Path(description="The review item's id", examples=[EXAMPLE_UUID])]


@router.get(
    "",
    response_model=ReviewItemsPublic,
    summary="List review items",
    description="Identify answers marked `uncertain` that the service kept (when ANIMALID_REVIEW_QUEUE is "
    "on), oldest first; filter by species and status. Needs the admin scope.",
    responses=error_responses(401, 403, 404, 422),
)
def list_items(
    principal: AdminPrincipal,
    session: SessionDep,
    registry: RegistryDep,
    pagination: PageDep,
    species: Annotated[str | None, Query(description="Only this species", examples=["dog"])] = None,
    status: Annotated[
        ReviewStatusName | None, Query(description="Only this status", examples=["pending"])
    ] = None,
) -> ReviewItemsPublic:
    return review.list_items(session, registry, species, status, pagination)


@router.get(
    "/{review_id}",
    response_model=ReviewItemPublic,
    summary="Get one review item",
    responses=error_responses(401, 403, 404, 422),
)
def get_item(principal: AdminPrincipal, session: SessionDep, review_id: ReviewIdPath) -> ReviewItemPublic:
    return review.get_item(session, review_id)


@router.get(
    "/{review_id}/image",
    response_class=Response,
    summary="The kept photo",
    description="The photo of a pending item (deleted from the queue once the item is resolved).",
    responses=error_responses(401, 403, 404, 422, extra={200: {"content": {"image/*": {}}}}),
)
def get_photo(
    principal: AdminPrincipal, session: SessionDep, runtime: RuntimeDep, review_id: ReviewIdPath
) -> Response:
    data, media_type = review.photo(session, runtime.store, review_id)
    return Response(content=data, media_type=media_type)


@router.post(
    "/{review_id}/resolve",
    response_model=ReviewItemPublic,
    summary="Resolve a review item",
    description="`confirm` with `individual_id`: the photo shows that individual and is enrolled to it. "
    "`new_individual` with `external_id` (and `name`): an animal not enrolled yet, created with the photo. "
    "`reject`: neither; nothing is enrolled. Once only (409 `review_already_resolved` after, "
    "409 `review_in_progress` while another request, through any API process, resolves it); audited. "
    "Needs the admin scope.",
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
def resolve(
    principal: AdminPrincipal,
    session: SessionDep,
    runtime: RuntimeDep,
    review_id: ReviewIdPath,
    body: ReviewResolve,
) -> ReviewItemPublic:
    return review.resolve(
        session,
        runtime.registry,
        runtime.store,
        runtime.metrics,
        runtime.images,
        review_id,
        body,
        principal,
    )
