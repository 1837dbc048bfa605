from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.exports import OutputIn, SafetensorsOutput
from core.jsonsafe import format_path
from core.methods import MethodConstraint
from core.webhooks import ssrf
from core.webhooks.schemas import WebhookEvent

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]

# Request bodies are strict (``strict=True``): JSON's true is not the integer 1 nor "5" the number
# 5 (pydantic's lax mode would take both, and a client's mistake would run). An integer is what
# JSON Schema, and so the OpenAPI spec, calls one: a number without a fraction, 5 or 5.0.
STRICT = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _integral_floats(value: Any) -> Any:
    """``value`` with every integral float an int (JSON Schema's integers), for the strict check."""
    if isinstance(value, dict):
        return {k: _integral_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats(v) for v in value]
    return _integral(value)


# An integer field of a request body: strict, but 5.0 is 5 (see STRICT).
JSONInt = Annotated[int, BeforeValidator(_integral)]


class StepIn(BaseModel):
    model_config = STRICT
    method: str = Field(min_length=1, max_length=100, examples=["prune.magnitude"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"sparsity": 0.5}])

    @model_validator(mode="after")
    def _params_strictly_typed(self) -> StepIn:
        """A method's parameters with the same strictness: validated as the JSON they came as,
        strict. Only the difference is reported here (a value pydantic's lax mode, which the job
        service validates with, would have converted); every other problem is the service's,
        which names its place."""
        from core.methods import get  # the registry: pydantic models, no torch

        spec = get(self.method)
        if spec is None:
            return self
        try:
            spec.params.model_validate_json(json.dumps(_integral_floats(self.params)), strict=True)
        except ValidationError as strict:
            try:
                spec.params.model_validate(self.params)
                lax_locs: set[tuple[int | str, ...]] = set()
            except ValidationError as lax:
                lax_locs = {tuple(e["loc"]) for e in lax.errors(include_url=False)}
            coerced = [e for e in strict.errors(include_url=False) if tuple(e["loc"]) not in lax_locs]
            if coerced:
                raise PydanticCustomError(
                    "strict_type",
                    "params.{field}: {msg} (a value of another JSON type is not converted)",
                    {"field": format_path(tuple(coerced[0]["loc"])), "msg": coerced[0]["msg"]},
                ) from None
        return self


class EvaluationIn(BaseModel):
    """How the job's report measures the original and the compressed model (worker/evaluate.py).

    Latency: ``runs`` timed forward passes of ``batch_size`` x ``seq_len`` tokens after
    ``warmup`` untimed ones, median reported. Quality and fidelity: up to ``max_samples`` texts of
    the eval dataset (or the built-in English corpus), each cut to ``seq_len`` tokens."""

    model_config = STRICT
    enabled: bool = Field(default=True, description="false: only sizes and sparsity are reported")
    batch_size: JSONInt = Field(default=1, ge=1, le=64)
    seq_len: JSONInt = Field(default=128, ge=8, le=4096)
    runs: JSONInt = Field(default=7, ge=1, le=100)
    warmup: JSONInt = Field(default=2, ge=0, le=20)
    max_samples: JSONInt = Field(default=32, ge=1, le=2000)
    budget_s: float = Field(
        default=15.0,
        ge=1.0,
        le=86400.0,
        description="seconds the report's measurements (latency, quality, fidelity of both models) may take "
        "in all; sample and run counts adapt to it, and the report says how many were used",
    )


def known_recipe(name: str | None) -> str | None:
    """A field validator's check of a recipe name (jobs, sweeps): a 422 ``unknown_recipe`` listing
    the recipes."""
    from core import recipes

    if name is not None and recipes.get(name) is None:
        raise PydanticCustomError("unknown_recipe", recipes.unknown_message(name))
    return name


class JobIn(BaseModel):
    model_config = STRICT
    model_id: str = Field(min_length=1, max_length=64)
    # Before steps: their check reads it (an export may be the whole job).
    output: OutputIn = Field(
        default_factory=SafetensorsOutput,
        description="the artifact's format: safetensors (default; compressed-tensors, for transformers and vLLM), "
        "gguf (llama.cpp) or onnx (ONNX Runtime), converted after the steps (docs/EXPORTS.md)",
    )
    # Before steps: a recipe stands for them.
    recipe: str | None = Field(
        default=None,
        max_length=64,
        examples=["w4-best"],
        description="a named recipe (GET /v1/recipes) instead of steps: its steps run, validated as if given",
    )
    steps: list[StepIn] = Field(
        default_factory=list,
        validate_default=True,  # left out is "no steps": the check below must see it
        max_length=32,
        description="the methods, in order; at least one, unless a recipe names them or the output is a gguf or "
        "onnx export (which may be the whole job: an ONNX int8 or GGUF Q4_K_M of the model as it is)",
    )
    name: str | None = Field(default=None, max_length=200)
    dataset_id: str | None = Field(
        default=None, max_length=64, description="calibration / training data for methods that need it"
    )
    eval_dataset_id: str | None = Field(default=None, max_length=64, description="data the report evaluates quality on")
    evaluation: EvaluationIn = Field(default_factory=EvaluationIn)
    webhook_url: str | None = Field(
        default=None,
        max_length=ssrf.MAX_URL_LENGTH,
        examples=["https://example.com/hooks/modelpress"],
        description="POSTed to, signed, when the job ends (succeeded, failed or canceled); see README "
        '"Webhooks". http(s) only; a host that resolves to a private, loopback or link-local address '
        "is refused (422 webhook_url_refused) unless allowed by MODELPRESS_WEBHOOK_ALLOW_NETWORKS",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None:
            ssrf.parse(v)  # the syntax only; where it points is checked at submit (app.webhooks.service)
        return v

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, name: str | None) -> str | None:
        return known_recipe(name)

    @field_validator("steps")
    @classmethod
    def _steps_or_an_export(cls, steps: list[StepIn], info: ValidationInfo) -> list[StepIn]:
        if info.data.get("recipe") is not None:
            if steps:
                raise PydanticCustomError("recipe_and_steps", "give steps or a recipe, not both")
            return steps
        if "recipe" not in info.data:  # the recipe did not validate: its error says enough
            return steps
        output = info.data.get("output")  # absent when it did not validate: then a step is needed too
        if not steps and (output is None or output.format == "safetensors"):
            raise PydanticCustomError(
                "too_short", "at least one step, unless a recipe names them or the output is an export (gguf or onnx)"
            )
        return steps

    def raw_steps(self) -> list[dict[str, Any]]:
        """The steps to validate: the recipe's, or those given."""
        from core import recipes

        recipe = recipes.get(self.recipe) if self.recipe else None
        return recipe.expand() if recipe is not None else [s.model_dump() for s in self.steps]


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


class JobPlan(BaseModel):
    """What a job will take, computed before it runs (core/jobs/plan.py) from the safetensors
    headers of the model, the steps, the evaluation and the workers' measured throughput."""

    model_config = ConfigDict(extra="allow")
    path: Literal["stream", "blocks", "whole"] = Field(
        description="stream: tensors are read and written one at a time (every step's method streams); "
        "blocks: llm-compressor's steps on the model with its weights on disk, one decoder block at a time; "
        "whole: the model is loaded whole"
    )
    peak_memory_bytes: int = Field(
        description="peak anonymous memory of the job's worker process (what an OOM kill counts; "
        "memory-mapped weight files excluded), its baseline included"
    )
    scratch_bytes: int = Field(description="disk the job's work folder takes at most (result, zip, downloaded input)")
    artifact_bytes: int = Field(description="size of the artifact (a zip for a model directory)")
    seconds: float = Field(description="expected wall time, evaluation included")
    model_bytes: int = Field(description="bytes of the model's tensors as stored")
    parameters: int
    largest_tensor_bytes: int = Field(description="the largest tensor, in float32")
    baseline_bytes: int = Field(description="a worker process's own memory (torch, transformers) counted in the peak")
    memory_factor: float = Field(
        description="peak above the baseline, per model byte (whole) or per byte of the largest "
        "tensor in float32, at most a 32 MiB row chunk (stream)"
    )
    evaluation: bool = Field(description="whether the plan counts the report's evaluation")
    evaluation_peak_bytes: int | None = None
    throughput_bytes_per_s: float = Field(description="work bytes per second the seconds come from")
    throughput_measured: bool = Field(description="false: the default throughput (no worker measured its own yet)")
    notes: list[str] = Field(default_factory=list, description="what the figures assume")


class FleetBudget(BaseModel):
    """The largest budgets of the live workers of the job's queue, and whether one can take the job."""

    queue: str
    workers: int = Field(description="live workers of the queue that published a budget")
    memory_bytes: int | None = Field(description="the largest memory budget among them")
    scratch_bytes: int | None = Field(description="the largest scratch disk budget among them")
    fits: bool = Field(description="whether one of them can take the job (false: POST /v1/jobs refuses it)")


class JobEstimate(JobPlan):
    """The plan of a job that is not submitted, with what the fleet can take (``fleet`` null: no
    live worker has published a budget, so a submit is accepted and the worker decides)."""

    fleet: FleetBudget | None = None


class JobOut(BaseModel):
    id: str
    name: str | None
    model_id: str | None
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    sweep_id: str | None = None
    evaluation: dict[str, Any] | None = None
    output: dict[str, Any] = Field(
        default_factory=lambda: SafetensorsOutput().model_dump(), description="the artifact's format (JobIn.output)"
    )
    status: JobStatus
    recipe: str | None = Field(default=None, description="the recipe the steps came from (JobIn.recipe), if any")
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
    plan: JobPlan | None = Field(
        default=None, description="what the job takes, computed at submit (null: submitted before plans)"
    )

    @classmethod
    def from_row(cls, job: Any, stage: str | None = None) -> JobOut:
        """``stage``: the progress stage as of now (app.jobs.service.stage), if not the row's."""
        return cls(
            id=job.id,
            name=job.name,
            model_id=job.model_id,
            dataset_id=job.dataset_id,
            eval_dataset_id=job.eval_dataset_id,
            sweep_id=job.sweep_id,
            evaluation=job.evaluation,
            output=job.output or SafetensorsOutput().model_dump(),
            status=job.status,
            recipe=job.recipe,
            steps=job.steps,
            queue=job.queue,
            progress=Progress(stage=stage or job.progress_stage, fraction=job.progress_fraction),
            attempt=job.attempt,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=JobError(code=job.error_code, message=job.error_message or "")
            if job.status == "failed" and job.error_code
            else None,
            metrics=job.metrics if job.status == "succeeded" else None,
            artifact=Artifact(
                size_bytes=job.artifact_size_bytes, sha256=job.artifact_sha256, filename=job.artifact_filename
            )
            if job.status == "succeeded" and job.artifact_sha256
            else None,
            webhook_url=job.webhook_url,
            plan=job.plan,
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
    memory_budget_bytes: int | None = Field(
        default=None, description="memory one job's process may reach (MODELPRESS_WORKER_MEMORY_BUDGET_MB)"
    )
    scratch_budget_bytes: int | None = Field(
        default=None, description="scratch disk one job may take (MODELPRESS_WORKER_SCRATCH_BUDGET_MB)"
    )
    throughput: dict[str, Any] | None = Field(
        default=None, description='measured work bytes per second by plan path: {"whole": {"bytes_per_s", "jobs"}, ...}'
    )
    runtimes: list[str] | None = Field(
        default=None,
        description="optional runtimes installed on it (llama_cpp: GGUF Q4_K_M exports and llama.cpp measurements; "
        "onnxruntime); null: not published (an older worker)",
    )


class MethodOut(BaseModel):
    name: str
    summary: str
    description: str
    needs_gpu: bool
    needs_data: bool
    formats: list[str]
    params_schema: dict[str, Any]
    constraints: list[MethodConstraint] = Field(
        default_factory=list,
        description="the method's limits beyond its parameters' types (docs/METHODS.md); "
        "a 422 names the one it hit in errors[].constraint",
    )
    recipes: list[str] = Field(
        default_factory=list, description="the named recipes this method is a step of (GET /v1/recipes)"
    )


class RecipeOut(BaseModel):
    name: str = Field(examples=["w4-best"])
    target: str = Field(description="what it compresses to: 8-bit, 4-bit, fp8, fp4, 2:4 or 50% unstructured")
    recommended: bool = Field(description="the recipe this service recommends for its target (one per target)")
    summary: str
    steps: list[dict[str, Any]] = Field(description="the steps a job naming it runs (JobIn.steps)")
    needs_data: bool = Field(description="a job naming it needs a dataset_id")
    measured: dict[str, Any] | None = Field(
        description="its figures on the project's benchmark model (model, measured_at, perplexity_ratio, seconds, "
        "artifact_bytes, size_ratio, and ood_perplexity_ratio: the same on out-of-domain English; or refused: "
        "why the model refused it), from bench/bench_quality.py (docs/QUALITY.md); null: not measured"
    )


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
    model_config = STRICT
    # The bounds on the int itself: on the union (around JSONInt's validator), pydantic would
    # write them into the spec as "ge"/"le", which JSON Schema does not know.
    ttl_s: Annotated[int, Field(ge=1, le=7 * 86400), BeforeValidator(_integral)] | None = Field(
        default=None, description="seconds the link stays valid (default: settings)"
    )


class LinkOut(BaseModel):
    url: str = Field(description="opens in a browser with no Authorization header until expires_at")
    expires_at: datetime


class WebhookPayload(BaseModel):
    """The JSON body POSTed to a job's ``webhook_url`` when it ends."""

    id: str = Field(description="the delivery id, also in X-Modelpress-Delivery: the same on every retry")
    event: WebhookEvent
    created_at: datetime = Field(description="when the job ended and this delivery was recorded")
    job: JobOut = Field(description="the job as GET /v1/jobs/{id} returned it when it ended")
