"""``quantize.cast``: cast floating-point weights to ``float16`` or ``bfloat16``.

Halves the bytes of fp32 weights. bfloat16 keeps fp32's range (no overflow) with fewer mantissa
bits; float16 is more precise near 1 but overflows above 65504. Integer tensors and buffers are
left as they are.

Example: ``{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}``
"""

from __future__ import annotations

from typing import Literal

from core.methods import MethodConstraint, StrictParams, register


class QuantizeCastParams(StrictParams):
    dtype: Literal["float16", "bfloat16"]


register(
    "quantize.cast",
    params=QuantizeCastParams,
    summary="Cast floating-point weights to float16 or bfloat16.",
    streams=True,
    constraints=[
        MethodConstraint(
            id="float_tensors_only",
            rule="Casts floating-point tensors only: integer tensors and buffers are left as they are.",
            checked=None,
        )
    ],
)
