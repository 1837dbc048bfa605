"""The worker's half of each method: the handler that runs it (and its streaming form).

``worker/methods/<name>.py`` registers a handler with :func:`handler` against the method that
``core/methods/<name>.py`` registered (its parameter model and submit-time check; docs/ARCHITECTURE.md).
:func:`load_all` imports both packages and joins them, failing loudly when a method has no handler,
a handler no method, or a method that says it streams has no streaming form.

Handler modules import torch inside their functions, not at module level: the worker imports them
all when it starts, the tensor math (``worker.ops``) when a job runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core import methods as core_methods
from core.methods import MethodSpec
from worker.context import Metrics


@dataclass(frozen=True)
class Method:
    """A method as the worker runs it: the core spec, its handler and its streaming form."""

    spec: MethodSpec
    # ``handler(model: LoadedModel, params, ctx: MethodContext) -> Metrics`` (worker/context.py).
    handler: Callable[..., Metrics]
    # ``stream(params, ctx) -> TensorStep`` (worker/stream), or None: the model must be in memory.
    stream: Callable[..., Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def params(self) -> type[core_methods.StrictParams]:
        return self.spec.params

    @property
    def needs_data(self) -> bool:
        return self.spec.needs_data

    @property
    def needs_gpu(self) -> bool:
        return self.spec.needs_gpu

    @property
    def blocks(self) -> bool:
        return self.spec.blocks

    @property
    def final(self) -> bool:
        return self.spec.final

    @property
    def check(self) -> Callable[[Any, core_methods.ModelInfo], None] | None:
        return self.spec.check


_HANDLERS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., Any] | None]] = {}


def handler(
    name: str, *, stream: Callable[..., Any] | None = None
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register ``fn(model: LoadedModel, params, ctx: JobContext) -> dict`` as the method ``name``'s
    handler, with its streaming form ``stream(params, ctx) -> TensorStep`` if it has one."""

    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in _HANDLERS:
            raise RuntimeError(f"handler of method {name!r} registered twice")
        _HANDLERS[name] = (fn, stream)
        return fn

    return deco


_methods: dict[str, Method] | None = None


def load_all() -> dict[str, Method]:
    """Import every handler module (failing loudly on a broken one), join them with core's methods,
    and return them by name."""
    global _methods
    if _methods is None:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        specs = core_methods.load_all()
        missing = sorted(set(specs) - set(_HANDLERS))
        orphans = sorted(set(_HANDLERS) - set(specs))
        if missing or orphans:
            raise RuntimeError(f"methods without a handler: {missing}; handlers without a method: {orphans}")
        out: dict[str, Method] = {}
        for name, spec in specs.items():
            fn, stream = _HANDLERS[name]
            if spec.streams != (stream is not None):
                raise RuntimeError(
                    f"method {name!r}: core says streams={spec.streams}, its handler "
                    f"{'has no' if stream is None else 'has a'} streaming form"
                )
            out[name] = Method(spec, fn, stream)
        _methods = out
    return dict(_methods)


def get(name: str) -> Method | None:
    return load_all().get(name)
