"""Named recipes: the step lists this service recommends for each compression target, and what
they measured on the project's benchmark model.

A job can name a recipe instead of giving steps (``POST /v1/jobs`` with ``{"model_id": ...,
"recipe": "w4-best"}``; ``--recipe`` on the CLI; ``recipe=`` in the SDK). The recipe is expanded
into its steps before they are validated, so a recipe is refused exactly as its steps would be
(a calibrated recipe without a ``dataset_id``, a rotation on an architecture it cannot rotate...),
and the job records both the recipe's name and the steps it ran. ``GET /v1/recipes`` lists them
with their measured figures, and each method in ``GET /v1/methods`` names the recipes it is part
of.

Each target has one recommended recipe (``recommended: true``) and may have alternatives (faster,
data-free, or for architectures the recommended one does not cover). The figures come from
``measured.json``, written by ``bench/bench_quality.py`` on the benchmark model it names
(perplexity ratio against the original on held-out text, calibration text disjoint from it; wall
seconds; artifact size); a recipe without figures says so. The choice of the recommended recipe per
target is written down in docs/QUALITY.md with the measurements behind it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

MEASURED_PATH = Path(__file__).with_name("measured.json")

# The targets, in the order GET /v1/recipes lists them.
TARGETS = ("8-bit", "4-bit", "fp8", "fp4", "2:4", "50% unstructured")


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str  # one of TARGETS
    summary: str
    steps: tuple[dict[str, Any], ...]
    recommended: bool = False

    def expand(self) -> list[dict[str, Any]]:
        """The steps, as a job's ``steps`` (fresh dicts: validation fills in defaults)."""
        steps: list[dict[str, Any]] = json.loads(json.dumps(list(self.steps)))
        return steps

    def methods(self) -> list[str]:
        return [s["method"] for s in self.steps]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "w8",
            "8-bit",
            "8-bit integer weights in groups of 128 (fallback groups where 128 does not divide a layer), "
            "round-to-nearest: data-free, streams. On the benchmark model one scale per output channel instead "
            "cost +8.7 % perplexity, groups of 128 none (docs/QUALITY.md).",
            ({"method": "quantize.weight_only", "params": {"bits": 8, "group_size": 128}},),
            recommended=True,
        ),
        Recipe(
            "w4-best",
            "4-bit",
            "GPTQ 4-bit weights in groups of 64 (fallback groups where 64 does not divide a layer), columns in "
            "activation order, scales searched by MSE: loads everywhere; needs a dataset. On the benchmark model "
            "groups of 64 beat groups of 128 by 6-9 % of perplexity for 0.3 % more bytes (docs/QUALITY.md).",
            ({"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 64, "observer": "mse"}},),
            recommended=True,
        ),
        Recipe(
            "w4-rotated",
            "4-bit",
            "SpinQuant rotations fused into the weights, then GPTQ 4-bit in groups of 128: Llama and Mistral only; "
            "needs a dataset.",
            (
                {"method": "transform.rotate", "params": {"style": "spinquant"}},
                {"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 128, "observer": "mse"}},
            ),
        ),
        Recipe(
            "w4-quip",
            "4-bit",
            "QuIP online Hadamard rotations, then GPTQ 4-bit in groups of 128: any architecture, the best 4-bit "
            "figure measured on the benchmark model; the rotations run at inference, so vLLM serves it and "
            "transformers alone does not (the checkpoint also carries the rotation matrices); needs a dataset.",
            (
                {"method": "transform.rotate", "params": {"style": "quip"}},
                {"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 128}},
            ),
        ),
        Recipe(
            "w4-fast",
            "4-bit",
            "4-bit weights in groups of 128, round-to-nearest: data-free, streams (larger than memory).",
            ({"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}},),
        ),
        Recipe(
            "fp8",
            "fp8",
            "FP8 weights per channel, FP8 activations per token at run time: data-free, streams; vLLM serves it on "
            "Hopper/Ada GPUs.",
            ({"method": "quantize.fp8", "params": {"scheme": "FP8_DYNAMIC"}},),
            recommended=True,
        ),
        Recipe(
            "fp4",
            "fp4",
            "NVFP4 weights (FP4 in groups of 16 with FP8 scales), 16-bit activations: data-free, streams; vLLM "
            "serves it on Blackwell GPUs.",
            ({"method": "quantize.fp4", "params": {"scheme": "NVFP4A16"}},),
            recommended=True,
        ),
        Recipe(
            "sparse-2of4",
            "2:4",
            "SparseGPT 2:4 semi-structured sparsity (two of every four weights zero, what sparse tensor cores "
            "run): needs a dataset.",
            ({"method": "prune.sparsegpt", "params": {"mask": "2:4"}},),
            recommended=True,
        ),
        Recipe(
            "sparse-50",
            "50% unstructured",
            "SparseGPT 50% unstructured sparsity with its error compensation: needs a dataset.",
            ({"method": "prune.sparsegpt", "params": {"sparsity": 0.5}},),
            recommended=True,
        ),
        Recipe(
            "sparse-50-fast",
            "50% unstructured",
            "Wanda 50% unstructured sparsity (weights x activation norms, no weight update): needs a dataset, "
            "faster than SparseGPT.",
            ({"method": "prune.wanda", "params": {"sparsity": 0.5}},),
        ),
    )
}


def get(name: str) -> Recipe | None:
    return RECIPES.get(name)


@cache
def measured() -> dict[str, Any]:
    """``measured.json`` as bench/bench_quality.py wrote it (``{"model": ..., "recipes": {name:
    figures}}``), or an empty record where it was never run."""
    try:
        return dict(json.loads(MEASURED_PATH.read_text()))
    except FileNotFoundError:
        return {}


def describe(recipe: Recipe) -> dict[str, Any]:
    """What ``GET /v1/recipes`` shows of a recipe (``RecipeOut``)."""
    from core.methods import load_all

    registry = load_all()
    record = measured()
    figures = (record.get("recipes") or {}).get(recipe.name)
    return {
        "name": recipe.name,
        "target": recipe.target,
        "recommended": recipe.recommended,
        "summary": recipe.summary,
        "steps": recipe.expand(),
        "needs_data": any(registry[m].needs_data for m in recipe.methods() if m in registry),
        "measured": (
            {"model": record.get("model"), "measured_at": record.get("measured_at"), **figures} if figures else None
        ),
    }


def recipes_of(method: str) -> list[str]:
    """The recipes ``method`` is a step of (``GET /v1/methods``' ``recipes``)."""
    return [r.name for r in RECIPES.values() if method in r.methods()]


def unknown_message(name: str) -> str:
    return f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)} (GET /v1/recipes)"
