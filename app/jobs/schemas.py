"""The typed shape of a job's metrics and report, for the OpenAPI document (docs/REPORTS.md says
what each field means; worker/pipeline.py and worker/evaluate.py write them).

The API returns the metrics as the worker stored them (``JobOut.metrics`` and ``JobReport`` in
core/jobs/schemas.py are free-form there): these models only describe them, so that a generated
client gets classes instead of dictionaries. app/openapi.py puts them in the document in place of
the free-form ones. Every section allows more fields than it names (a newer worker may add some),
and a field a section may lack is optional: a section that could not be measured is
``{"available": false, "reason": ...}``. tests/test_openapi.py validates reports against them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from core.jobs.schemas import JobStatus

OPEN = ConfigDict(extra="allow")


class ParameterCounts(BaseModel):
    model_config = OPEN
    original: int | None = Field(default=None, description="parameters of the uploaded model")
    total: int | None = Field(default=None, description="parameters of the result (quantization scales excluded)")
    nonzero: int | None = None


class SizeMetrics(BaseModel):
    """Bytes before and after; ratios are stated with each field."""

    model_config = OPEN
    original_bytes: int | None = Field(default=None, description="the upload, in bytes")
    artifact_bytes: int | None = Field(default=None, description="the artifact as stored and served")
    compression_ratio: float | None = Field(default=None, description="original_bytes / artifact_bytes")
    original_weight_bytes: int | None = Field(default=None, description="tensor data of the upload")
    artifact_weight_bytes: int | None = Field(default=None, description="tensor data of the artifact")
    weight_bytes_ratio: float | None = Field(default=None, description="artifact_weight_bytes / original_weight_bytes")
    memory_bytes: int | None = Field(default=None, description="the result's weights once loaded")
    parameters: ParameterCounts | None = None
    mean_bits_per_weight: float | None = Field(default=None, description="8 x artifact tensor bytes / parameters")


class LayerSparsity(BaseModel):
    model_config = OPEN
    name: str
    parameters: int | None = None
    zeros: int | None = None
    sparsity: float | None = None


class SparsityMetrics(BaseModel):
    model_config = OPEN
    sparsity: float | None = Field(default=None, description="zeros / weights of the targeted layers")
    target_parameters: int | None = None
    target_zeros: int | None = None
    overall: float | None = Field(default=None, description="zeros / all parameters")
    per_layer: list[LayerSparsity] = Field(default_factory=list)


class LatencyStats(BaseModel):
    model_config = OPEN
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    samples_ms: list[float] = Field(default_factory=list)


class SectionSeconds(BaseModel):
    """Seconds a section's passes took, per model."""

    model_config = OPEN
    original: float | None = None
    compressed: float | None = None


class EvaluationBudget(BaseModel):
    """The evaluation budget's whole account (docs/REPORTS.md, "Evaluation on a budget")."""

    model_config = OPEN
    budget_s: float | None = None
    prepare_s: float | None = Field(default=None, description="loading the tokenizer, tokenizing")
    shares_s: dict[str, float | None] | None = Field(
        default=None, description="{samples, latency, artifact_load} seconds"
    )
    seconds: float | None = Field(default=None, description="everything measured")
    within_budget: bool | None = None
    artifact_load_s: float | None = None
    first_forward_s: float | None = Field(default=None, description="the artifact's first pass, decompression included")


class MeasuredSection(BaseModel):
    """What every measured section (speed, quality, fidelity) has: whether it was measured, why
    not, and what of the evaluation budget it used (docs/REPORTS.md, "Evaluation on a budget")."""

    model_config = OPEN
    available: bool
    reason: str | None = Field(default=None, description="why the section is not available")
    limited_by: str | None = Field(default=None, description="`budget`, `max_samples` / `runs` (the cap) or `data`")
    budget_note: str | None = None
    seconds: SectionSeconds | None = None
    budget: EvaluationBudget | None = None


class SpeedMetrics(MeasuredSection):
    device: str | None = None
    threads: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    runs: int | None = None
    warmup: int | None = None
    runs_requested: int | None = None
    warmup_requested: int | None = None
    original: LatencyStats | None = None
    compressed: LatencyStats | None = None
    runs_as: str | None = Field(default=None, description="`dense`, `int8_kernels` or `decompressed`")
    kernel: str | None = None
    note: str | None = None
    latency_ratio: float | None = Field(default=None, description="compressed / original median latency")
    speedup: float | None = Field(default=None, description="original / compressed; null when not claimed")


class QualityDataset(BaseModel):
    model_config = OPEN
    source: str | None = None
    id: str | None = None
    samples: int | None = None
    tokens: int | None = None


class QualityIntervals(BaseModel):
    """95 % confidence intervals, ``[low, high]`` (null: fewer than 2 texts)."""

    model_config = OPEN
    original: list[float] | None = None
    compressed: list[float] | None = None
    ratio: list[float] | None = None


class FidelityIntervals(BaseModel):
    """95 % confidence intervals, ``[low, high]``."""

    model_config = OPEN
    kl_mean: list[float] | None = None
    top1_agreement: list[float] | None = None
    output_cosine: list[float] | None = None


class QualityMetrics(MeasuredSection):
    metric: str | None = Field(default=None, description="`perplexity`, `accuracy` or `embedding_cosine`")
    higher_is_better: bool | None = None
    original: float | None = None
    compressed: float | None = None
    delta: float | None = None
    ratio: float | None = Field(default=None, description="compressed / original")
    ci95: QualityIntervals | None = None
    ci_method: str | None = None
    ci_reason: str | None = None
    dataset: QualityDataset | None = None
    samples: int | None = None
    samples_requested: int | None = None
    samples_available: int | None = None


class FidelityMetrics(MeasuredSection):
    on: str | None = Field(default=None, description="`logits` or `last_hidden_state`")
    inputs: str | None = None
    samples: int | None = None
    tokens: int | None = None
    kl_mean: float | None = None
    top1_agreement: float | None = None
    output_cosine: float | None = None
    ci95: FidelityIntervals | None = None
    ci_method: str | None = None
    reasons: dict[str, str] | None = Field(default=None, description="why a field is null")
    samples_requested: int | None = None
    samples_available: int | None = None


class MemoryMetrics(BaseModel):
    model_config = OPEN
    peak_rss_bytes: int | None = None
    how: str | None = None
    peak_cuda_bytes: int | None = None


class StepMetrics(BaseModel):
    """One step of the job and what its method measured (e.g. quantization error)."""

    model_config = OPEN
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    seconds: float | None = None


class StageSeconds(RootModel[dict[str, float]]):
    """Seconds per stage: `load`, `evaluate_original`, `step<i>:<method>`, `save`, `evaluate_compressed`
    (or `evaluate_streamed`), `store`, and `total`."""


class JobMetrics(BaseModel):
    """What a succeeded job measured (``metrics`` of a job; the body of its report)."""

    model_config = OPEN
    size: SizeMetrics
    sparsity: SparsityMetrics
    speed: SpeedMetrics | None = None
    quality: QualityMetrics | None = None
    fidelity: FidelityMetrics | None = None
    memory: MemoryMetrics | None = None
    steps: list[StepMetrics] = Field(default_factory=list)
    stage_seconds: StageSeconds = Field(default_factory=lambda: StageSeconds({}))
    notes: dict[str, Any] = Field(default_factory=dict, description="how the artifact stores and runs its weights")
    evaluation: dict[str, Any] | None = Field(default=None, description="the evaluation settings used")
    engine: dict[str, Any] | None = Field(default=None, description="how the job ran (stream, blocks, whole)")
    export: dict[str, Any] | None = Field(
        default=None,
        description="the output format's conversion (gguf, onnx): files, bytes, tensor type or quantization, "
        "exactness, seconds, and the runtime's own measurements (docs/EXPORTS.md); absent for safetensors",
    )


class JobReport(JobMetrics):
    """What the job changed, measured (docs/REPORTS.md): the job's metrics with its identity."""

    job_id: str
    job_name: str | None
    model_id: str | None
    sweep_id: str | None
    status: JobStatus
    created_at: datetime
    finished_at: datetime | None


# The examples of the job spec (POST /v1/jobs, POST /v1/jobs/estimate), shown by /docs and /redoc.
JOB_EXAMPLES: dict[str, dict[str, Any]] = {
    "prune": {
        "summary": "Half of the weights pruned by magnitude",
        "value": {
            "model_id": "0c4a1b2e-6f1d-4d8e-9d6a-2b1f3c4d5e6f",
            "name": "gpt2-50pct",
            "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
        },
    },
    "quantize": {
        "summary": "4-bit weights in groups of 64, a short evaluation",
        "value": {
            "model_id": "0c4a1b2e-6f1d-4d8e-9d6a-2b1f3c4d5e6f",
            "name": "gpt2-w4g64",
            "steps": [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 64}}],
            "evaluation": {"max_samples": 8, "budget_s": 10},
        },
    },
}
