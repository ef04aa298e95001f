"""``/individuals``: list, read, rename, delete and merge individuals; list and delete their images."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import FileResponse

from service.api.deps import AdminPrincipal, ReadPrincipal, RegistryDep, RuntimeDep, SessionDep
from service.api.openapi import error_responses
from service.schemas import (
    EXAMPLE_IMAGE_UUID,
    EXAMPLE_UUID,
    DeleteResult,
    ImagePublic,
    ImagesPublic,
    IndividualPublic,
    IndividualsPublic,
    IndividualUpdate,
    MergeRequest,
    MergeResult,
    PlainText,
)
from service.services import individuals
from service.services.individuals import Page
from training.preprocess import IMAGE_FORMATS

router = APIRouter(prefix="/individuals", tags=["individuals"])


MAX_OFFSET = 2**63 - 1
"""The largest offset the databases take (a 64-bit integer); beyond it a 422 names the parameter."""


def page(
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip", examples=[0])] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="Page size", examples=[50])] = 50,
) -> Page:
    return Page(offset=offset, limit=limit)


PageDep = Annotated[Page, Depends(page)]
IndividualIdPath = Annotated[uuid.UUID, Path(description="The individual's id", examples=[EXAMPLE_UUID])]
ImageIdPath = Annotated[uuid.UUID, Path(description="The image's id", examples=[EXAMPLE_IMAGE_UUID])]


@router.get(
    "",
    response_model=IndividualsPublic,
    summary="List individuals",
    description="Paginated, oldest first; filter by species and by external id. Needs the read scope.",
    responses=error_responses(401, 403, 404, 422),
)
def list_individuals(
    principal: ReadPrincipal,
    session: SessionDep,
    registry: RegistryDep,
    pagination: PageDep,
    species: Annotated[str | None, Query(description="Only this species", examples=["dog"])] = None,
    external_id: Annotated[
        PlainText | None, Query(description="Only this external id", examples=["kennel-7/rex"])
    ] = None,
) -> IndividualsPublic:
    return individuals.list_individuals(session, registry, species, external_id, pagination)


@router.get(
    "/{individual_id}",
    response_model=IndividualPublic,
    summary="Get an individual",
    responses=error_responses(401, 403, 404, 422),
)
def get_individual(
    principal: ReadPrincipal, session: SessionDep, individual_id: IndividualIdPath
) -> IndividualPublic:
    return individuals.get_individual(session, individual_id)


@router.patch(
    "/{individual_id}",
    response_model=IndividualPublic,
    summary="Update an individual's name and metadata",
    description=(
        "Fields present in the body are set (metadata is replaced whole); at least one must be present. "
        "Needs the admin scope."
    ),
    responses=error_responses(400, 401, 403, 404, 422),
)
def update_individual(
    principal: AdminPrincipal, session: SessionDep, individual_id: IndividualIdPath, update: IndividualUpdate
) -> IndividualPublic:
    return individuals.update_individual(session, individual_id, update, principal)


@router.delete(
    "/{individual_id}",
    response_model=DeleteResult,
    summary="Delete an individual, its images and their vectors",
    description="It stops being identifiable as soon as the answer arrives. Needs the admin scope.",
    responses=error_responses(401, 403, 404, 422),
)
def delete_individual(
    principal: AdminPrincipal, session: SessionDep, runtime: RuntimeDep, individual_id: IndividualIdPath
) -> DeleteResult:
    return individuals.delete_individual(session, runtime.registry, runtime.store, individual_id, principal)


@router.post(
    "/{individual_id}/merge",
    response_model=MergeResult,
    summary="Merge another individual into this one",
    description=(
        "Moves every image of `source_id` to this individual (an image it already has is dropped), "
        "then deletes "
        "the source. Both must be of the same species. The source's name and metadata are kept in the audit "
        "log. Merging an individual into itself changes nothing and answers with it. Needs the admin scope."
    ),
    responses=error_responses(400, 401, 403, 404, 409, 422),
)
def merge_individuals(
    principal: AdminPrincipal,
    session: SessionDep,
    runtime: RuntimeDep,
    individual_id: IndividualIdPath,
    request: MergeRequest,
) -> MergeResult:
    return individuals.merge(
        session, runtime.registry, runtime.store, individual_id, request.source_id, principal
    )


@router.get(
    "/{individual_id}/images",
    response_model=ImagesPublic,
    summary="List an individual's images",
    responses=error_responses(401, 403, 404, 422),
)
def list_images(
    principal: ReadPrincipal, session: SessionDep, individual_id: IndividualIdPath, pagination: PageDep
) -> ImagesPublic:
    return individuals.list_images(session, individual_id, pagination)


@router.get(
    "/{individual_id}/images/{image_id}",
    response_model=ImagePublic,
    summary="Get one image's record",
    responses=error_responses(401, 403, 404, 422),
)
def get_image(
    principal: ReadPrincipal, session: SessionDep, individual_id: IndividualIdPath, image_id: ImageIdPath
) -> ImagePublic:
    return individuals.get_image(session, individual_id, image_id)


@router.get(
    "/{individual_id}/images/{image_id}/file",
    response_class=FileResponse,
    summary="Download the original enrolled image",
    responses=error_responses(
        401,
        403,
        404,
        422,
        extra={200: {"content": {f.media_type: {} for f in IMAGE_FORMATS}}},
    ),
)
def get_image_file(
    principal: ReadPrincipal,
    session: SessionDep,
    runtime: RuntimeDep,
    individual_id: IndividualIdPath,
    image_id: ImageIdPath,
) -> FileResponse:
    path, media_type = individuals.image_file(session, runtime.store, individual_id, image_id)
    return FileResponse(path, media_type=media_type)


@router.delete(
    "/{individual_id}/images/{image_id}",
    response_model=ImagePublic,
    summary="Delete one image and its vector",
    description="Returns the deleted image's record. Needs the admin scope.",
    responses=error_responses(401, 403, 404, 422),
)
def delete_image(
    principal: AdminPrincipal,
    session: SessionDep,
    runtime: RuntimeDep,
    individual_id: IndividualIdPath,
    image_id: ImageIdPath,
) -> ImagePublic:
    return individuals.delete_image(
        session, runtime.registry, runtime.store, individual_id, image_id, principal
    )
