"""Jobs as the API and the CLI see them: queue a fine-tune or a herd check, list, describe, cancel.

A job is a row of the ``jobs`` table; a worker process (:mod:`service.worker`) claims and runs it.
Queueing and cancelling are audited like any other change.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from service.db.job_repository import JobRepository
from service.db.models import Job, JobStatus, utcnow
from service.db.repository import Repository
from service.errors import InvalidRequest, JobConflict, JobNotFound, SpeciesNotFound
from service.schemas_jobs import FinetuneRequest, JobPublic, JobsPublic
from service.security import Principal
from service.services.finetune import start_folder

FINETUNE = "finetune"
HERD_CHECK = "herd_check"
STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING, *JobStatus.FINISHED)


def queue_finetune(
    session: Session, species: str, request: FinetuneRequest, actor: Principal, models_dir: Path
) -> JobPublic:
    """Queue a fine-tune of ``species``; one at a time per species, from an artifact of the models
    folder that can be fine-tuned (:func:`start_folder`). Commits."""
    if Repository(session).species_by_name(species) is None:
        raise SpeciesNotFound(f"unknown species {species!r}", species=species)
    start_folder(models_dir, species, request.start)
    return _queue(session, FINETUNE, species, request.model_dump(exclude_none=True), actor.fingerprint)


def queue_herd_check(session: Session, species: str, actor: str) -> JobPublic:
    """Queue a herd check of ``species`` (:mod:`service.services.herd_check`), kept in its card when
    done; one at a time per species. Commits."""
    if Repository(session).species_by_name(species) is None:
        raise SpeciesNotFound(f"unknown species {species!r}", species=species)
    return _queue(session, HERD_CHECK, species, {}, actor)


def _queue(session: Session, kind: str, species: str, params: dict[str, object], actor: str) -> JobPublic:
    jobs = JobRepository(session)
    active = jobs.active_for(species, kind)
    if active is not None:
        raise JobConflict(
            f"a {kind} job of {species} is already {active.status}", job_id=str(active.id), species=species
        )
    job = jobs.add(
        Job(
            kind=kind,
            species=species,
            status=JobStatus.QUEUED,
            params=params,
            progress={"stage": "queued"},
            result={},
            cancel_requested=False,
            attempts=0,
            created_by=actor[:64],
        )
    )
    Repository(session).audit(f"{kind}_queued", species, actor[:64], None, {"job_id": str(job.id)})
    session.commit()
    return JobPublic.model_validate(job)


def get_job(session: Session, job_id: uuid.UUID) -> JobPublic:
    job = JobRepository(session).get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}", job_id=str(job_id))
    return JobPublic.model_validate(job)


def list_jobs(
    session: Session, species: str | None, status: str | None, offset: int, limit: int
) -> JobsPublic:
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", status=status)
    rows, total = JobRepository(session).list(species, status, offset, limit)
    return JobsPublic(
        data=[JobPublic.model_validate(r) for r in rows], count=total, offset=offset, limit=limit
    )


def cancel_job(session: Session, job_id: uuid.UUID, actor: Principal) -> JobPublic:
    """A queued job ends at once; a running one at its worker's next check (between epochs). Commits."""
    job = JobRepository(session).get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}", job_id=str(job_id))
    if job.status in JobStatus.FINISHED:
        raise JobConflict(
            f"job {job_id} has already ended: {job.status}", job_id=str(job_id), status=job.status
        )
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELLED
        job.finished_at = utcnow()
    Repository(session).audit(
        "job_cancel", job.species, actor.fingerprint, None, {"job_id": str(job.id), "status": job.status}
    )
    session.commit()
    return JobPublic.model_validate(job)
