"""``/species``: loaded models, versions, thresholds and card metrics; reload after a model change."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.concurrency import run_in_threadpool

from service.api.deps import AdminPrincipal, ReadPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses
from service.schemas import ReloadResult, SpeciesList, SpeciesPublic
from service.services import species

router = APIRouter(prefix="/species", tags=["species"])

SpeciesPath = Annotated[
    str, Path(description="Species name (its folder in the models directory)", examples=["dog"])
]


@router.get(
    "",
    response_model=SpeciesList,
    summary="List species and their models",
    description=(
        "Every species with an artifact in the models folder or rows in the database: status (`ready`, "
        "`reindexing`, `building`, `disabled` with a reason), model version, the card's pair threshold, "
        "how `/identify` decides now (`identify`: the threshold for the gallery's size, target FPIR, "
        "review band, minimum match confidence), the model card's metrics, device and index size. "
        "Needs the read scope."
    ),
    responses=error_responses(401, 403),
)
def list_species(principal: ReadPrincipal, session: SessionDep, runtime: RuntimeDep) -> SpeciesList:
    return SpeciesList(data=species.describe(session, runtime.registry, runtime.limits))


@router.get(
    "/{name}",
    response_model=SpeciesPublic,
    summary="Describe one species",
    responses=error_responses(401, 403, 404),
)
def get_species(
    principal: ReadPrincipal, session: SessionDep, runtime: RuntimeDep, name: SpeciesPath
) -> SpeciesPublic:
    return species.describe_one(session, runtime.registry, runtime.limits, name)


@router.post(
    "/{name}/reload",
    response_model=ReloadResult,
    status_code=202,
    summary="Reload a species' artifact after replacing it",
    description=(
        "Reads `<models_dir>/<name>/` again. A new model version re-embeds every stored image in the "
        "background while the current model and index keep serving, then replaces both at once. Progress "
        "shows in `GET /species/{name}`. Needs the admin scope."
    ),
    responses=error_responses(401, 403, 404),
)
async def reload_species(principal: AdminPrincipal, runtime: RuntimeDep, name: SpeciesPath) -> ReloadResult:
    return await run_in_threadpool(species.reload_species, runtime.lifecycle, name, principal)
