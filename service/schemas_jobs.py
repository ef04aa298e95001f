"""Pydantic schemas of the job API: fine-tune requests, jobs with their progress and decision."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FinetuneRequest(BaseModel):
    """What ``POST /species/{name}/finetune`` and ``animalid finetune`` accept; omitted: the settings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"epochs": 3}]})
    epochs: int | None = Field(default=None, ge=1, le=100, description="Training epochs")
    lr: float | None = Field(default=None, gt=0, le=1, description="Peak learning rate")
    holdout: float | None = Field(
        default=None, gt=0, lt=1, description="Share of each animal's enrolment batches held back to judge"
    )
    start: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Artifact folder in the models folder to start from (default: the serving model)",
    )


class JobPublic(BaseModel):
    id: uuid.UUID
    kind: str
    species: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    params: dict[str, Any]
    progress: dict[str, Any] = Field(description="stage, epoch, epochs, loss, eta_s while it runs")
    result: dict[str, Any] = Field(description="champion and challenger metrics and the decision")
    error: str | None
    cancel_requested: bool
    attempts: int
    worker: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None

    model_config = ConfigDict(from_attributes=True)


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filters, all pages together")
    offset: int
    limit: int
