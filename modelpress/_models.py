"""Typed results of the modelpress SDK (pydantic v2 models of the API's JSON).

Every model keeps fields it does not declare (``extra="allow"``): a newer server's fields are not
lost, and ``model_dump(mode="json")`` gives back what the server sent. Statuses are plain strings
(a newer server may add one); the known values are the ``*_STATUSES`` constants.

    Model (ModelFile, ImportProgress)   POST/GET /v1/models, POST /v1/models/import
    Dataset                      POST/GET /v1/datasets
    Job (Step, Progress, ErrorInfo, Artifact, Plan)   POST/GET /v1/jobs
    Estimate (FleetBudget)       POST /v1/jobs/estimate
    Report                       GET /v1/jobs/{id}/report (sections are dicts: docs/REPORTS.md)
    Link                         POST /v1/jobs/{id}/report/link, /v1/sweeps/{id}/link
    Sweep (SweepPoint, PointMetrics, Counts, SweepSpec), SweepSummary   /v1/sweeps
    Method (MethodConstraint), Worker   GET /v1/methods, /v1/workers
    ApiKey, CreatedApiKey        GET/POST /v1/keys, POST /v1/keys/revoke
    Page[T]                      one page of a list: items, next_cursor
    Download                     what Client.download wrote
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "JOB_STATUSES",
    "MODEL_STATUSES",
    "TERMINAL_STATUSES",
    "ApiKey",
    "Artifact",
    "Counts",
    "CreatedApiKey",
    "Dataset",
    "Download",
    "ErrorInfo",
    "Estimate",
    "FleetBudget",
    "ImportProgress",
    "Job",
    "Link",
    "Method",
    "MethodConstraint",
    "Model",
    "ModelFile",
    "Page",
    "Plan",
    "PointMetrics",
    "Progress",
    "Report",
    "Step",
    "Sweep",
    "SweepPoint",
    "SweepSpec",
    "SweepSummary",
    "Worker",
]

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
MODEL_STATUSES = ("importing", "ready", "failed")
MODEL_DONE_STATUSES = frozenset({"ready", "failed"})

T = TypeVar("T")


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ModelFile(_Base):
    name: str
    size_bytes: int
    sha256: str


class ImportProgress(_Base):
    """How far an import got: bytes and files fetched of the totals (a total is None until known)."""

    bytes_done: int = 0
    bytes_total: int | None = None
    files_done: int = 0
    files_total: int | None = None


class Model(_Base):
    """An uploaded or imported model. ``format``: ``hf`` (a directory) or ``safetensors`` (one bare
    file). ``status``: ``importing``, ``ready`` or ``failed`` (None from a server older than
    imports: the model is ready); while an import runs, ``format``, ``parameters``, ``size_bytes``
    and ``sha256`` may be None, ``source`` is where it comes from, ``progress`` how far it got, and
    a failed import's ``error`` is the problem body (``code``, ``detail``) saying why."""

    id: str
    name: str
    format: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    created_at: datetime
    files: list[ModelFile] = Field(default_factory=list)
    status: str | None = None
    source: str | None = None
    progress: ImportProgress | None = None
    error: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        """True once the model can be used (every model of a server older than imports is)."""
        return self.status in (None, "ready")

    @property
    def done(self) -> bool:
        """True unless an import is still running."""
        return self.status in MODEL_DONE_STATUSES or self.status is None


class Dataset(_Base):
    """An uploaded dataset (``txt``: a sample a line; ``jsonl``: ``{"text", "label"?}`` a line)."""

    id: str
    name: str
    format: str
    samples: int
    labeled: bool
    labels: list[int] | list[str] | None = None
    size_bytes: int
    sha256: str
    created_at: datetime


class Step(_Base):
    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class Progress(_Base):
    stage: str | None = None
    fraction: float = 0.0


class ErrorInfo(_Base):
    """Why a job (or a sweep point) failed."""

    code: str
    message: str = ""


class Artifact(_Base):
    """A succeeded job's result: its size, sha256 (also the download's ETag) and filename."""

    size_bytes: int
    sha256: str
    filename: str


class Plan(_Base):
    """What a job takes, computed before it runs: ``path`` (``stream``, ``blocks`` or ``whole``),
    ``peak_memory_bytes`` (the worker process's peak, its baseline included), ``scratch_bytes``,
    ``artifact_bytes``, ``seconds``, and the inputs they come from; ``notes`` say what they assume."""

    path: str
    peak_memory_bytes: int
    scratch_bytes: int
    artifact_bytes: int
    seconds: float
    model_bytes: int = 0
    parameters: int = 0
    largest_tensor_bytes: int = 0
    baseline_bytes: int = 0
    memory_factor: float = 0.0
    evaluation: bool = True
    evaluation_peak_bytes: int | None = None
    throughput_bytes_per_s: float = 0.0
    throughput_measured: bool = False
    notes: list[str] = Field(default_factory=list)


class FleetBudget(_Base):
    """The largest budgets of the live workers of a queue; ``fits``: one of them can take the job."""

    queue: str
    workers: int
    memory_bytes: int | None = None
    scratch_bytes: int | None = None
    fits: bool


class Estimate(Plan):
    """``POST /v1/jobs/estimate``: the plan, and ``fleet`` (None: no live worker published a budget)."""

    fleet: FleetBudget | None = None


class Job(_Base):
    """A compression job. ``status``: queued, running, succeeded, failed or canceled."""

    id: str
    name: str | None = None
    model_id: str | None = None
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    sweep_id: str | None = None
    evaluation: dict[str, Any] | None = None
    status: str
    recipe: str | None = None  # the named recipe its steps came from
    steps: list[Step] = Field(default_factory=list)
    queue: str | None = None
    progress: Progress = Field(default_factory=Progress)
    attempt: int = 0
    cancel_requested: bool = False
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorInfo | None = None
    metrics: dict[str, Any] | None = None
    artifact: Artifact | None = None
    plan: Plan | None = None

    @property
    def done(self) -> bool:
        """True once the job has succeeded, failed or been canceled."""
        return self.status in TERMINAL_STATUSES


class Report(_Base):
    """What a job changed, measured (docs/REPORTS.md). ``speed``, ``quality`` and ``fidelity`` are
    ``{"available": true, ...}`` or ``{"available": false, "reason": ...}``; fields a newer
    server adds are kept (``extra="allow"``)."""

    job_id: str
    job_name: str | None = None
    model_id: str | None = None
    sweep_id: str | None = None
    status: str
    created_at: datetime
    finished_at: datetime | None = None
    size: dict[str, Any] = Field(default_factory=dict)
    sparsity: dict[str, Any] = Field(default_factory=dict)
    speed: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = Field(default_factory=list)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    notes: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None


class Link(_Base):
    """A signed link that a browser opens with no API key, until ``expires_at``."""

    url: str
    expires_at: datetime


class SweepSpec(_Base):
    steps: list[dict[str, Any]]
    vary: dict[str, list[Any]]
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    evaluation: dict[str, Any] | None = None


class Counts(_Base):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0


class PointMetrics(_Base):
    artifact_bytes: int | None = None
    compression_ratio: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    quality_metric: str | None = None
    quality: float | None = None
    higher_is_better: bool | None = None
    kl_mean: float | None = None
    top1_agreement: float | None = None
    sparsity: float | None = None


class SweepPoint(_Base):
    index: int
    values: dict[str, Any]
    job_id: str | None = None
    status: str
    metrics: PointMetrics | None = None
    error: ErrorInfo | None = None
    on_frontier: bool = False


class Sweep(_Base):
    """A sweep: one job per point of the grid, and the Pareto frontier of the succeeded points.
    ``status``: queued, running, succeeded, failed, partial or canceled."""

    id: str
    name: str | None = None
    model_id: str | None = None
    created_at: datetime
    status: str
    spec: SweepSpec
    counts: Counts
    points: list[SweepPoint] = Field(default_factory=list)
    frontier: list[int] = Field(default_factory=list)
    frontier_axes: dict[str, str] = Field(default_factory=dict)
    frontier_note: str = ""

    @property
    def done(self) -> bool:
        return self.status in {"succeeded", "failed", "partial", "canceled"}


class SweepSummary(_Base):
    """A sweep in a list: counts and status, no points."""

    id: str
    name: str | None = None
    model_id: str | None = None
    created_at: datetime
    status: str
    points: int
    spec: SweepSpec
    counts: Counts


class MethodConstraint(_Base):
    """One limit of a method beyond its parameters' types (docs/METHODS.md): ``rule`` says it in a
    sentence; ``checked``: ``submit`` (a job that breaks it is refused with a 422 whose error entry
    names it in ``constraint``), ``run`` (the worker enforces it) or None (nothing is refused)."""

    id: str
    rule: str
    params: list[str] = Field(default_factory=list)
    checked: str | None = "submit"
    values: dict[str, Any] = Field(default_factory=dict)


class Method(_Base):
    name: str
    summary: str = ""
    description: str = ""
    needs_gpu: bool = False
    needs_data: bool = False
    formats: list[str] = Field(default_factory=list)
    params_schema: dict[str, Any] = Field(default_factory=dict)
    constraints: list[MethodConstraint] = Field(default_factory=list)  # [] from a server older than them
    recipes: list[str] = Field(default_factory=list)  # the named recipes it is a step of


class Recipe(_Base):
    """A named recipe (``GET /v1/recipes``): a job can give ``recipe=name`` instead of steps."""

    name: str
    target: str
    recommended: bool = False
    summary: str = ""
    steps: list[Step] = Field(default_factory=list)
    needs_data: bool = False
    # Its figures on the project's benchmark model (perplexity_ratio, seconds, artifact_bytes...);
    # None: not measured.
    measured: dict[str, Any] | None = None


class Worker(_Base):
    id: str
    hostname: str
    queues: list[str]
    device: str
    started_at: datetime
    last_seen_at: datetime
    live: bool
    memory_budget_bytes: int | None = None
    scratch_budget_bytes: int | None = None
    throughput: dict[str, Any] | None = None


class ApiKey(_Base):
    """An API key as the API lists it (never its secret). ``scopes``: [] or ["admin"];
    ``revoked_at`` is set once it is revoked."""

    id: str
    tenant: str
    tenant_id: str
    prefix: str
    scopes: list[str] = Field(default_factory=list)
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class CreatedApiKey(ApiKey):
    """A key just created: ``key`` is the whole key, returned this once."""

    key: str


class Page(_Base, Generic[T]):
    """One page of a list, newest first; pass ``next_cursor`` back for the next (None: the last)."""

    items: list[T]
    next_cursor: str | None = None


class Download(_Base):
    """What ``download()`` wrote: the file, its size and verified sha256, and the offset it resumed
    from (0: downloaded from the start)."""

    path: Path
    size_bytes: int
    sha256: str
    resumed_from: int = 0
