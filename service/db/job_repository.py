"""Queries for learning the enrolled animals: the gallery with its enrolment batches, and the job queue.

Claiming a job is one short transaction. On Postgres the candidate row is read with
``FOR UPDATE SKIP LOCKED``, so concurrent workers each take a different job without waiting on one
another; on both backends the claim is a compare-and-set ``UPDATE`` (status and attempt count as
read), so two workers can never both win a job, SQLite included.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import AuditEntry, Image, Individual, Job, JobStatus, utcnow


@dataclass(frozen=True)
class GalleryImage:
    image_id: uuid.UUID
    individual_id: uuid.UUID
    external_id: str | None
    storage_path: str
    created_at: datetime


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def _count(self, statement: Any) -> int:
        """Rows an UPDATE touched."""
        result = self.session.execute(statement)
        assert isinstance(result, CursorResult)
        return int(result.rowcount)

    # The gallery ---------------------------------------------------------------------------------

    def gallery_images(self, species_id: int) -> Iterator[GalleryImage]:
        query = (
            select(
                Image.id, Image.individual_id, Individual.external_id, Image.storage_path, Image.created_at
            )
            .join(Individual, Individual.id == Image.individual_id)
            .where(Individual.species_id == species_id)
            .order_by(Image.individual_id, Image.created_at, Image.id)
        )
        for row in self.session.execute(query):
            yield GalleryImage(*row)

    def enrolment_batches(self, species: str) -> dict[str, int]:
        """Image id (as text) -> id of the audited enroll request that stored it."""
        query = select(AuditEntry.id, AuditEntry.details).where(
            AuditEntry.action == "enroll", AuditEntry.species == species
        )
        batches: dict[str, int] = {}
        for entry_id, details in self.session.execute(query):
            for image_id in (details or {}).get("images", []):
                batches[str(image_id)] = int(entry_id)
        return batches

    # Jobs ---------------------------------------------------------------------------------------

    def add(self, job: Job) -> Job:
        self.session.add(job)
        self.session.flush()
        return job

    def get(self, job_id: uuid.UUID) -> Job | None:
        return self.session.get(Job, job_id)

    def active_for(self, species: str, kind: str) -> Job | None:
        return self.session.scalars(
            select(Job)
            .where(
                Job.species == species,
                Job.kind == kind,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            )
            .limit(1)
        ).first()

    def list(self, species: str | None, status: str | None, offset: int, limit: int) -> tuple[list[Job], int]:
        query = select(Job)
        if species is not None:
            query = query.where(Job.species == species)
        if status is not None:
            query = query.where(Job.status == status)
        total = int(self.session.scalar(select(func.count()).select_from(query.subquery())) or 0)
        rows = self.session.scalars(query.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit))
        return list(rows), total

    def claim(
        self, worker: str, stale_after: timedelta, postgres: bool, only: uuid.UUID | None = None
    ) -> Job | None:
        """Take the oldest queued job, or a running one whose worker fell silent; None when idle.

        Commits. A job whose claim is lost to another worker is skipped and the next one tried.
        """
        for _ in range(8):
            now = utcnow()
            query = (
                select(Job.id, Job.status, Job.attempts)
                .where(
                    or_(
                        Job.status == JobStatus.QUEUED,
                        and_(Job.status == JobStatus.RUNNING, Job.heartbeat_at < now - stale_after),
                    )
                )
                .order_by(Job.created_at, Job.id)
                .limit(1)
            )
            if only is not None:
                query = query.where(Job.id == only)
            if postgres:
                query = query.with_for_update(skip_locked=True)
            row = self.session.execute(query).first()
            if row is None:
                self.session.rollback()
                return None
            job_id, status, attempts = row
            won = self._count(
                update(Job)
                .where(Job.id == job_id, Job.status == status, Job.attempts == attempts)
                .values(
                    status=JobStatus.RUNNING,
                    worker=worker,
                    attempts=attempts + 1,
                    heartbeat_at=now,
                    started_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            self.session.commit()
            if won:
                job = self.get(job_id)
                if job is not None:
                    self.session.refresh(job)
                return job
        return None

    def heartbeat(
        self, job_id: uuid.UUID, worker: str, progress: dict[str, Any] | None = None
    ) -> tuple[bool, bool]:
        """Mark the job alive (and store its progress). Commits. Returns (still held by ``worker``,
        cancel asked for)."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if progress is not None:
            values["progress"] = progress
        held = self._count(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        self.session.commit()
        cancel = self.session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        self.session.rollback()
        return bool(held), bool(cancel)

    def release(self, job_id: uuid.UUID, worker: str) -> None:
        """Hand a job this worker holds back to the queue (no commit)."""
        self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, worker=None)
            .execution_options(synchronize_session=False)
        )

    def finish(
        self, job_id: uuid.UUID, worker: str, status: str, result: dict[str, Any], error: str | None
    ) -> bool:
        """End a job this worker holds (no commit); False when another worker has taken it over."""
        return bool(
            self._count(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
                .values(status=status, result=result, error=error, finished_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        )
