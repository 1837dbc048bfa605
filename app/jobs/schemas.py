from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class StepIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(min_length=1, max_length=100, examples=["prune.magnitude"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"sparsity": 0.5}])


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1, max_length=64)
    steps: list[StepIn] = Field(min_length=1, max_length=32)
    name: str | None = Field(default=None, max_length=200)
    dataset_id: str | None = Field(default=None, max_length=64, description="calibration / training data for methods that need it")
    eval_dataset_id: str | None = Field(default=None, max_length=64, description="data the report evaluates quality on")


class Progress(BaseModel):
    stage: str | None
    fraction: float


class JobError(BaseModel):
    code: str
    message: str


class Artifact(BaseModel):
    size_bytes: int
    sha256: str
    filename: str


class JobOut(BaseModel):
    id: str
    name: str | None
    model_id: str | None
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    status: JobStatus
    steps: list[dict[str, Any]]
    queue: str
    progress: Progress
    attempt: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None = None
    metrics: dict[str, Any] | None = None
    artifact: Artifact | None = None

    @classmethod
    def from_row(cls, job: Any) -> "JobOut":
        return cls(
            id=job.id,
            name=job.name,
            model_id=job.model_id,
            dataset_id=job.dataset_id,
            eval_dataset_id=job.eval_dataset_id,
            status=job.status,
            steps=job.steps,
            queue=job.queue,
            progress=Progress(stage=job.progress_stage, fraction=job.progress_fraction),
            attempt=job.attempt,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=JobError(code=job.error_code, message=job.error_message or "") if job.status == "failed" and job.error_code else None,
            metrics=job.metrics if job.status == "succeeded" else None,
            artifact=Artifact(size_bytes=job.artifact_size_bytes, sha256=job.artifact_sha256, filename=job.artifact_filename)
            if job.status == "succeeded" and job.artifact_sha256
            else None,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class MethodOut(BaseModel):
    name: str
    summary: str
    description: str
    needs_gpu: bool
    needs_data: bool
    formats: list[str]
    params_schema: dict[str, Any]
