"""``quantize.cast``: the handler (core/methods/quantize_cast.py has the method's parameters,
checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.quantize_cast import QuantizeCastParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


def _stream(params: QuantizeCastParams, ctx: Any) -> Any:
    from worker.stream.steps import CastStep

    return CastStep(params.dtype)


@handler("quantize.cast", stream=_stream)
def quantize_cast(model: LoadedModel, params: QuantizeCastParams, ctx: MethodContext) -> Metrics:
    """Cast floating-point weights to float16 or bfloat16."""
    import torch

    dtype = getattr(torch, params.dtype)
    if model.module is not None:
        before = {p.dtype for p in model.module.parameters()}
        model.module.to(dtype)
        cast = sum(p.numel() for p in model.module.parameters() if p.is_floating_point())
    else:
        before = {t.dtype for t in model.state.values()}
        cast = 0
        for k, t in model.state.items():
            if t.is_floating_point():
                model.state[k] = t.to(dtype)
                cast += t.numel()
    return {
        "dtype": params.dtype,
        "from_dtypes": sorted(str(d).removeprefix("torch.") for d in before),
        "cast_parameters": cast,
    }
