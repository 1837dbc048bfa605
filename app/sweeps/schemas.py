from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.exports import OutputIn, SafetensorsOutput
from core.jobs.schemas import STRICT, EvaluationIn, JobError, JobStatus, LinkIn, LinkOut, StepIn, known_recipe  # noqa: F401 - links are the jobs' kind

# A sweep varies at most this many parameters...
MAX_VARY_PATHS = 4
# ...and has at most this many points (the product of the value counts). A constant, not a
# setting: every point is a job row and a queued task, all created in one request.
MAX_POINTS = 64

SweepStatus = Literal["queued", "running", "succeeded", "failed", "partial", "canceled"]

VaryValues = Annotated[list[Any], Field(min_length=1, max_length=MAX_POINTS)]


class SweepIn(BaseModel):
    model_config = ConfigDict(
        **STRICT,
        json_schema_extra={
            "examples": [
                {
                    "model_id": "0c4a1b2e-6f1d-4d8e-9d6a-2b1f3c4d5e6f",
                    "name": "gpt2-sparsity",
                    "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
                    "vary": {"steps[0].params.sparsity": [0.3, 0.5, 0.7]},
                },
                {
                    "model_id": "0c4a1b2e-6f1d-4d8e-9d6a-2b1f3c4d5e6f",
                    "name": "which-4-bit",
                    "vary": {"recipe": ["w4-best", "w4-fast", "w4-quip"]},
                    "dataset_id": "7d2f0e1a-3b4c-4d5e-8f6a-1b2c3d4e5f60",
                },
            ]
        },
    )
    model_id: str = Field(min_length=1, max_length=64)
    recipe: str | None = Field(
        default=None,
        max_length=64,
        examples=["w4-best"],
        description="a named recipe (GET /v1/recipes) whose steps every point starts from, instead of steps "
        "(`vary` paths then index the recipe's steps)",
    )
    steps: list[StepIn] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="the base steps every point starts from; give steps, a recipe, or vary `recipe`",
    )
    vary: dict[str, VaryValues] = Field(
        min_length=1,
        max_length=MAX_VARY_PATHS,
        description=f"`steps[<i>].params.<name>` -> the values it takes, or `recipe` -> recipe names (one job "
        f"per recipe, compared side by side); one job per combination (at most {MAX_VARY_PATHS} paths and "
        f"{MAX_POINTS} points)",
        examples=[{"steps[0].params.sparsity": [0.3, 0.5, 0.7]}, {"recipe": ["w4-best", "w4-fast", "w8"]}],
    )
    name: str | None = Field(default=None, max_length=200)
    dataset_id: str | None = Field(
        default=None, max_length=64, description="calibration / training data for methods that need it"
    )
    eval_dataset_id: str | None = Field(default=None, max_length=64, description="data the reports evaluate quality on")
    evaluation: EvaluationIn = Field(default_factory=EvaluationIn)
    output: OutputIn = Field(
        default_factory=SafetensorsOutput, description="every point's artifact format (as a job's output)"
    )

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, name: str | None) -> str | None:
        return known_recipe(name)


class SweepSpec(BaseModel):
    # The base steps (a fixed recipe's, expanded); [] when the sweep varies the recipe.
    steps: list[dict[str, Any]]
    recipe: str | None = None
    vary: dict[str, list[Any]]
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    evaluation: dict[str, Any] | None = None
    output: dict[str, Any] | None = None


class Counts(BaseModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0


class PointMetrics(BaseModel):
    """A succeeded point's numbers, taken from its job's metrics; null where not measured."""

    artifact_bytes: int | None = None
    compression_ratio: float | None = None
    latency_ms: float | None = None
    # The report's claimed speed-up; null when the model runs the original's kernels (the same
    # shapes, or decompressed): its latency differences are then noise.
    speedup: float | None = None
    quality_metric: str | None = None
    quality: float | None = None
    higher_is_better: bool | None = None
    kl_mean: float | None = None
    top1_agreement: float | None = None
    sparsity: float | None = None


# A failed point's error is its job's: one schema for both (a generated client has one class).
PointError = JobError


class PointOut(BaseModel):
    index: int
    values: dict[str, Any]
    job_id: str | None
    status: JobStatus
    metrics: PointMetrics | None = None
    error: PointError | None = None
    on_frontier: bool = False


class SweepOut(BaseModel):
    id: str
    name: str | None
    model_id: str | None
    created_at: datetime
    status: SweepStatus
    spec: SweepSpec
    counts: Counts
    points: list[PointOut]
    frontier: list[int] = Field(description="indices of the points on the Pareto frontier")
    frontier_axes: dict[str, str] = Field(description="axis -> the metric compared and its direction")
    frontier_note: str = Field(description="which points were left out of the frontier, and why")


class SweepSummary(BaseModel):
    """A sweep in a list: its counts and status, without the points (GET the sweep for those)."""

    id: str
    name: str | None
    model_id: str | None
    created_at: datetime
    status: SweepStatus
    points: int
    spec: SweepSpec
    counts: Counts


class SweepPage(BaseModel):
    items: list[SweepSummary]
    next_cursor: str | None
