"""Pydantic schemas of the job API: fine-tune requests, jobs with their progress and decision."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FinetuneRequest(BaseModel):
    """What ``POST /species/{name}/finetune`` and ``animalid finetune`` accept; omitted: the settings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"epochs": 3}]})
    epochs: int | None = Field(default=None, ge=1, le=100, description="Training epochs")
    lr: float | None = Field(default=None, gt=0, le=1, description="Peak learning rate")
    holdout: float | None = Field(
        default=None, gt=0, lt=1, description="Share of each animal's enrolment batches held back to judge"
    )
    strangers: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Share of the gallery's animals kept out of training to calibrate the new model for "
        "never-enrolled animals",
    )
    start: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Artifact folder in the models folder to start from (default: the serving model)",
    )


JOB_EXAMPLE: dict[str, Any] = {
    "id": "7d0c4c2e-3c1e-4d7b-9a53-0e7f1b0c2a11",
    "kind": "finetune",
    "species": "dog",
    "status": "running",
    "params": {"epochs": 3},
    "progress": {"stage": "train", "epoch": 2, "epochs": 3, "loss": 4.27, "epoch_s": 48.1, "eta_s": 48.1},
    "result": {},
    "error": None,
    "cancel_requested": False,
    "attempts": 1,
    "worker": "worker-host:4242",
    "created_by": "admin-3f2a",
    "created_at": "2026-12-02T16:22:22Z",
    "started_at": "2026-12-02T16:26:12Z",
    "heartbeat_at": "2026-12-02T16:28:01Z",
    "finished_at": None,
}


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [JOB_EXAMPLE]})
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

    @model_validator(mode="after")
    def _stage_is_the_status_unless_running(self) -> JobPublic:
        """Out of a worker's hands (queued, or ended by any path: a worker, a cancel while queued),
        the stage is the status; the last epoch's figures stay. Stored, it would be the last stage
        the job ran (a succeeded job said ``evaluate``)."""
        if self.status != "running":
            self.progress = {**self.progress, "stage": self.status}
        return self


class JobsPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"data": [JOB_EXAMPLE], "count": 1, "offset": 0, "limit": 50}]}
    )
    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filters, all pages together")
    offset: int
    limit: int
