"""The method registry: what the API knows of each compression method.

A method is a pair of files with the same name (docs/ARCHITECTURE.md):

* ``core/methods/<name>.py``: the module docstring (the paper, a sample config; ``GET /v1/methods``
  shows it), a strict pydantic parameter model and its submit-time check, registered with
  :func:`register`. No torch: the API validates job specs with it.
* ``worker/methods/<name>.py``: the handler (and its streaming form), registered against the same
  method name with ``worker.methods.handler``.

Every module here is imported by :func:`load_all` (those whose name starts with ``_`` hold what
several methods share), so a new file is picked up by the API's validation and ``GET /v1/methods``;
the worker refuses to start when a method registered here has no handler, or a handler no method.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictParams(BaseModel):
    """Base for method parameters: unknown keys are errors, values are not coerced from strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# Files from which AutoTokenizer builds an uploaded model's tokenizer (a fast tokenizer, a
# WordPiece vocabulary, or a byte-level BPE pair): methods that tokenize text need one of them.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"))


def has_tokenizer(files: tuple[str, ...] | list[str]) -> bool:
    names = set(files)
    return any(all(f in names for f in fs) for fs in TOKENIZER_FILE_SETS)


@dataclass(frozen=True)
class ModelInfo:
    """What submit-time checks know of the job's model (no weights are read)."""

    format: str  # "hf" | "safetensors"
    architecture: str | None = None
    config: dict[str, Any] | None = None  # config.json of an HF model
    files: tuple[str, ...] = ()  # names of the uploaded files (e.g. to see a tokenizer is there)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[StrictParams]
    summary: str
    # The module docstring of core/methods/<name>.py: the paper, the parameters, a sample config.
    description: str = ""
    needs_gpu: bool = False
    needs_data: bool = False
    # Model formats the method accepts: "hf" (a transformers directory) and/or "safetensors".
    formats: frozenset[str] = field(default_factory=lambda: frozenset({"hf", "safetensors"}))
    # Optional submit-time check against the model: raise ValueError("why") to refuse (422).
    check: Callable[[Any, ModelInfo], None] | None = None
    # True when the method leaves weights in a form other methods cannot change (packed integers):
    # it must be the last weight-changing step of a job.
    final: bool = False
    # True when the method has a streaming form (worker/stream): it transforms the checkpoint
    # tensor by tensor from the shards without building the model. The worker's handler for the
    # method must then give its ``stream`` (checked when the worker loads its handlers).
    streams: bool = False
    # True when the handler only changes the model through llm-compressor's sequential pipeline,
    # which onloads one decoder block at a time: such steps run on a model whose weights stay on
    # disk (the block path, worker/pipeline.py). Handlers that write weights in place must not.
    blocks: bool = False


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    params: type[StrictParams],
    summary: str,
    needs_gpu: bool = False,
    needs_data: bool = False,
    formats: tuple[str, ...] = ("hf", "safetensors"),
    check: Callable[[Any, ModelInfo], None] | None = None,
    final: bool = False,
    streams: bool = False,
    blocks: bool = False,
) -> MethodSpec:
    """Register the method ``name`` (called once, at the bottom of core/methods/<name>.py)."""
    if name in _REGISTRY:
        raise RuntimeError(f"method {name!r} registered twice")
    module = sys.modules.get(params.__module__)
    description = inspect.cleandoc(module.__doc__ or "") if module else ""
    spec = MethodSpec(
        name, params, summary, description, needs_gpu, needs_data, frozenset(formats), check, final, streams, blocks
    )
    _REGISTRY[name] = spec
    return spec


_loaded = False


def load_all() -> dict[str, MethodSpec]:
    """Import every method module (failing loudly on a broken one) and return the registry."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> MethodSpec | None:
    return load_all().get(name)


class StepError(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def validate_steps(
    steps: list[dict[str, Any]], model: ModelInfo | None = None, has_dataset: bool = True
) -> list[dict[str, Any]]:
    """Validate raw steps against the registry (and the model, when given); return them
    normalised (defaults filled in).

    Raises StepError with one entry per problem, each with a ``loc`` naming the field.
    """
    registry = load_all()
    errors: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    final_at: int | None = None
    for i, step in enumerate(steps):
        loc = ["body", "steps", i]
        spec = registry.get(step.get("method", ""))
        if spec is None:
            errors.append(
                {
                    "loc": [*loc, "method"],
                    "msg": f"unknown method {step.get('method')!r}; see GET /v1/methods",
                    "type": "unknown_method",
                }
            )
            continue
        if model is not None and model.format not in spec.formats:
            errors.append(
                {
                    "loc": [*loc, "method"],
                    "msg": f"{spec.name} does not support {model.format!r} models",
                    "type": "unsupported_model",
                }
            )
            continue
        if spec.needs_data and not has_dataset:
            errors.append(
                {
                    "loc": ["body", "dataset_id"],
                    "msg": f"{spec.name} needs data: give the job a dataset_id",
                    "type": "dataset_required",
                }
            )
            continue
        if final_at is not None:
            errors.append(
                {
                    "loc": [*loc, "method"],
                    "msg": f"step {final_at} leaves packed weights; it must be the last step",
                    "type": "step_order",
                }
            )
            continue
        try:
            params = spec.params.model_validate(step.get("params") or {})
        except ValidationError as e:
            for err in e.errors(include_url=False, include_input=False, include_context=False):
                errors.append({"loc": [*loc, "params", *err["loc"]], "msg": err["msg"], "type": err["type"]})
            continue
        if model is not None and spec.check is not None:
            try:
                spec.check(params, model)
            except ValueError as e:
                errors.append({"loc": [*loc, "params"], "msg": str(e), "type": "unsupported_model"})
                continue
        if spec.final:
            final_at = i
        out.append({"method": spec.name, "params": params.model_dump(mode="json")})
    if errors:
        raise StepError(errors)
    return out
