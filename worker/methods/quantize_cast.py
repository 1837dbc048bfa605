"""``quantize.cast``: cast floating-point weights to ``float16`` or ``bfloat16``.

Halves the bytes of fp32 weights. bfloat16 keeps fp32's range (no overflow) with fewer mantissa
bits; float16 is more precise near 1 but overflows above 65504. Integer tensors and buffers are
left as they are.

Example: ``{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}``
"""

from __future__ import annotations

from typing import Any, Literal

from worker.methods import StrictParams, register


class QuantizeCastParams(StrictParams):
    dtype: Literal["float16", "bfloat16"]


def _stream(params: QuantizeCastParams, ctx: Any) -> Any:
    from worker.stream.steps import CastStep

    return CastStep(params.dtype)


@register("quantize.cast", params=QuantizeCastParams, stream=_stream)
def quantize_cast(model: Any, params: QuantizeCastParams, ctx: Any) -> dict[str, Any]:
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
    return {"dtype": params.dtype, "from_dtypes": sorted(str(d).removeprefix("torch.") for d in before), "cast_parameters": cast}
