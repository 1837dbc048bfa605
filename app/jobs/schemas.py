from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.webhooks import ssrf

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class StepIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(min_length=1, max_length=100, examples=["prune.magnitude"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"sparsity": 0.5}])


class EvaluationIn(BaseModel):
    """How the job's report measures the original and the compressed model (worker/evaluate.py).

    Latency: ``runs`` timed forward passes of ``batch_size`` x ``seq_len`` tokens after
    ``warmup`` untimed ones, median reported. Quality and fidelity: up to ``max_samples`` texts of
    the eval dataset (or the built-in English corpus), each cut to ``seq_len`` tokens."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="false: only sizes and sparsity are reported")
    batch_size: int = Field(default=1, ge=1, le=64)
    seq_len: int = Field(default=128, ge=8, le=4096)
    runs: int = Field(default=7, ge=1, le=100)
    warmup: int = Field(default=2, ge=0, le=20)
    max_samples: int = Field(default=32, ge=1, le=2000)
    budget_s: float = Field(
        default=30.0, ge=1.0, le=86400.0,
        description="seconds the report's measurements (latency, quality, fidelity of both models) may take "
        "in all; sample and run counts adapt to it, and the report says how many were used",
    )


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1, max_length=64)
    steps: list[StepIn] = Field(min_length=1, max_length=32)
    name: str | None = Field(default=None, max_length=200)
    dataset_id: str | None = Field(default=None, max_length=64, description="calibration / training data for methods that need it")
    eval_dataset_id: str | None = Field(default=None, max_length=64, description="data the report evaluates quality on")
    evaluation: EvaluationIn = Field(default_factory=EvaluationIn)
    webhook_url: str | None = Field(
        default=None, max_length=ssrf.MAX_URL_LENGTH, examples=["https://example.com/hooks/modelpress"],
        description="POSTed to, signed, when the job ends (succeeded, failed or canceled); see README "
        "\"Webhooks\". http(s) only; a host that resolves to a private, loopback or link-local address "
        "is refused (422 webhook_url_refused) unless allowed by MODELPRESS_WEBHOOK_ALLOW_NETWORKS",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None:
            ssrf.parse(v)  # the syntax only; where it points is checked at submit (app.webhooks.service)
        return v


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
    sweep_id: str | None = None
    evaluation: dict[str, Any] | None = None
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
    webhook_url: str | None = None

    @classmethod
    def from_row(cls, job: Any, stage: str | None = None) -> "JobOut":
        """``stage``: the progress stage as of now (app.jobs.service.stage), if not the row's."""
        return cls(
            id=job.id,
            name=job.name,
            model_id=job.model_id,
            dataset_id=job.dataset_id,
            eval_dataset_id=job.eval_dataset_id,
            sweep_id=job.sweep_id,
            evaluation=job.evaluation,
            status=job.status,
            steps=job.steps,
            queue=job.queue,
            progress=Progress(stage=stage or job.progress_stage, fraction=job.progress_fraction),
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
            webhook_url=job.webhook_url,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class WorkerOut(BaseModel):
    """A worker main process (``modelpress worker``) from the registry; ``live``: seen within the
    last three reconcile intervals."""

    id: str = Field(description="<hostname>:<pid>")
    hostname: str
    queues: list[str]
    device: str = Field(examples=["cpu", "cuda:0 (NVIDIA H100 80GB HBM3)"])
    started_at: datetime
    last_seen_at: datetime
    live: bool


class MethodOut(BaseModel):
    name: str
    summary: str
    description: str
    needs_gpu: bool
    needs_data: bool
    formats: list[str]
    params_schema: dict[str, Any]


class JobReport(BaseModel):
    """What the job changed, measured (docs/REPORTS.md). Each of ``speed``, ``quality`` and
    ``fidelity`` is ``{"available": true, ...}`` or ``{"available": false, "reason": ...}``."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    job_name: str | None
    model_id: str | None
    sweep_id: str | None
    status: JobStatus
    created_at: datetime
    finished_at: datetime | None
    size: dict[str, Any]
    sparsity: dict[str, Any]
    speed: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    steps: list[dict[str, Any]]
    stage_seconds: dict[str, float]
    notes: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None


class LinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_s: int | None = Field(default=None, ge=1, le=7 * 86400, description="seconds the link stays valid (default: settings)")


class LinkOut(BaseModel):
    url: str = Field(description="opens in a browser with no Authorization header until expires_at")
    expires_at: datetime
