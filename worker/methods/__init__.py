"""The method registry.

A compression method is one module in this package: a strict pydantic parameter model and a
handler registered with :func:`register`. Every module here is imported by :func:`load_all`, so a
new file is picked up by the API's validation, ``GET /v1/methods`` and the worker with no other
change.

Method modules must not import torch at module level: the API imports this registry to validate
job specs and must stay light. Handlers import their tensor math (``worker.ops``) inside.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictParams(BaseModel):
    """Base for method parameters: unknown keys are errors, values are not coerced from strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[StrictParams]
    handler: Callable[..., dict[str, Any]]
    summary: str
    needs_gpu: bool = False
    needs_data: bool = False
    # Model formats the method accepts: "hf" (a transformers directory) and/or "safetensors".
    formats: frozenset[str] = field(default_factory=lambda: frozenset({"hf", "safetensors"}))


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    params: type[StrictParams],
    needs_gpu: bool = False,
    needs_data: bool = False,
    formats: tuple[str, ...] = ("hf", "safetensors"),
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        _REGISTRY[name] = MethodSpec(name, params, fn, summary, needs_gpu, needs_data, frozenset(formats))
        return fn

    return deco


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


def validate_steps(steps: list[dict[str, Any]], model_format: str | None = None) -> list[dict[str, Any]]:
    """Validate raw steps against the registry; return them normalised (defaults filled in).

    Raises StepError with one entry per problem, each with a ``loc`` naming the field.
    """
    registry = load_all()
    errors: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        loc = ["body", "steps", i]
        spec = registry.get(step.get("method", ""))
        if spec is None:
            errors.append({"loc": [*loc, "method"], "msg": f"unknown method {step.get('method')!r}; see GET /v1/methods", "type": "unknown_method"})
            continue
        if model_format is not None and model_format not in spec.formats:
            errors.append({"loc": [*loc, "method"], "msg": f"{spec.name} does not support {model_format!r} models", "type": "unsupported_model"})
            continue
        try:
            params = spec.params.model_validate(step.get("params") or {})
        except ValidationError as e:
            for err in e.errors(include_url=False, include_input=False, include_context=False):
                errors.append({"loc": [*loc, "params", *err["loc"]], "msg": err["msg"], "type": err["type"]})
            continue
        out.append({"method": spec.name, "params": params.model_dump(mode="json")})
    if errors:
        raise StepError(errors)
    return out
