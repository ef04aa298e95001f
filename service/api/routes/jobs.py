"""``/jobs``, ``POST /species/{name}/finetune`` and ``POST /species/{name}/herd-check``: queue a
fine-tune or a herd check, follow it, cancel it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from service.api.deps import AdminPrincipal, ReadPrincipal, RuntimeDep, SessionDep
from service.api.openapi import error_responses
from service.api.routes.individuals import PageDep
from service.schemas_jobs import FinetuneRequest, JobPublic, JobsPublic
from service.services import jobs

router = APIRouter(tags=["jobs"])

JobIdPath = Annotated[
    uuid.UUID, Path(description="The job's id", examples=["7d0c4c2e-3c1e-4d7b-9a53-0e7f1b0c2a11"])
]


@router.post(
    "/species/{name}/finetune",
    response_model=JobPublic,
    status_code=202,
    summary="Queue a fine-tune on the species' enrolled photos",
    description=(
        "A worker process exports the gallery, fine-tunes from the serving model (or `start`), judges the "
        "serving model and the new one on the same held-back enrolment batches, and promotes the new one "
        "only when it wins by the configured margins on top-1 and on the false-match rate at the species' "
        "threshold. One fine-tune per species at a time (409 `job_conflict`). A start that cannot be "
        "fine-tuned (no such artifact, another species', a fused model with no trained network) is "
        "refused with 422 `invalid_request`. Needs the admin scope."
    ),
    responses=error_responses(401, 403, 404, 409, 422),
)
def queue_finetune(
    principal: AdminPrincipal,
    session: SessionDep,
    runtime: RuntimeDep,
    name: Annotated[str, Path(description="Species name", examples=["dog"])],
    request: Annotated[FinetuneRequest | None, Body(examples=[{"epochs": 3, "lr": 0.01}])] = None,
) -> JobPublic:
    return jobs.queue_finetune(
        session, name, request or FinetuneRequest(), principal, runtime.settings.models_dir
    )


@router.post(
    "/species/{name}/herd-check",
    response_model=JobPublic,
    status_code=202,
    summary="Queue a herd check of the species' open-set thresholds",
    description=(
        "A worker process leaves each enrolled animal out in turn and asks its stored vectors against the "
        "rest, as a never-enrolled herd-mate would be asked, and keeps the result in the serving model "
        "card: where the herd's animals reach the card's threshold for the target FPIR more often than the "
        "target, `/identify` raises that threshold by the difference (`threshold_source` `herd_check`). "
        "The result lists, per target FPIR, the threshold, the share of herd-mates' photos past it, its 95% "
        "interval over the animals and the threshold that holds the target. Idle workers queue one by "
        "themselves as a gallery grows (`ANIMALID_HERD_CHECK_GROWTH`). One per species at a time (409 "
        "`job_conflict`). Needs the admin scope."
    ),
    responses=error_responses(401, 403, 404, 409),
)
def queue_herd_check(
    principal: AdminPrincipal,
    session: SessionDep,
    name: Annotated[str, Path(description="Species name", examples=["cattle"])],
) -> JobPublic:
    return jobs.queue_herd_check(session, name, principal.fingerprint)


@router.get(
    "/jobs",
    response_model=JobsPublic,
    summary="List jobs",
    description="Newest first, with progress, metrics and decisions. Needs the read scope.",
    responses=error_responses(401, 403, 422),
)
def list_jobs(
    principal: ReadPrincipal,
    session: SessionDep,
    pagination: PageDep,
    species: Annotated[str | None, Query(description="Only this species", examples=["dog"])] = None,
    status: Annotated[str | None, Query(description="Only this status", examples=["running"])] = None,
) -> JobsPublic:
    return jobs.list_jobs(session, species, status, pagination.offset, pagination.limit)


@router.get(
    "/jobs/{job_id}",
    response_model=JobPublic,
    summary="Describe a job: progress (epoch, loss, ETA), result and decision",
    responses=error_responses(401, 403, 404),
)
def get_job(principal: ReadPrincipal, session: SessionDep, job_id: JobIdPath) -> JobPublic:
    return jobs.get_job(session, job_id)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    description=(
        "A queued job ends at once; a running one stops at its next epoch. A job that has ended answers "
        "409 `job_conflict`. Needs the admin scope."
    ),
    responses=error_responses(401, 403, 404, 409),
)
def cancel_job(principal: AdminPrincipal, session: SessionDep, job_id: JobIdPath) -> JobPublic:
    return jobs.cancel_job(session, job_id, principal)
