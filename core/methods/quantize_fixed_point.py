"""``quantize.fixed_point``: the study's fixed-point weights ``round(w * 2^n) / 2^n``.

``frac_bits`` n (0..16) fractional bits and a total width ``bits`` (2..8, default 8, sign
included): each weight is stored as the integer ``clamp(round(w * 2^n), -2^(bits-1),
2^(bits-1) - 1)`` with the power-of-two scale ``2^-n`` and zero point 0, so the representable
values are ``k / 2^n`` for those k. Inside that range the result equals the study's formula
exactly (scaling by a power of two is exact in floating point); weights whose rounded value falls
outside are clipped to the nearest end, and the step reports how many (``clipped_fraction``):
pick n so that ``max|w| < 2^(bits-1-n)`` to clip nothing, or accept clipping for resolution.

Why bits 2..8: the integers are stored through compressed-tensors' int8 container and dense
int32 packing (``pack-quantized``, 1..8 bits); 1 bit would be the codes {-1, 0}, which cannot
represent a positive weight. Why frac_bits 0..16: ``2^-16`` is still exact as a float16 scale
(subnormal; float16's smallest is 2^-24) and finer than any 8-bit grid a weight needs.

Saved as compressed-tensors ``pack-quantized`` with strategy ``channel``: every output row
carries the same scale ``2^-n`` (one value per row, negligible bytes), the layout
compressed-tensors' loaders handle for weight-only integers. Targets every ``nn.Linear`` except
the LM head (``ignore`` list); embeddings, norms and biases stay float. GPT-2-style models
(transformers ``Conv1D``) and bare safetensors are refused at submit. It must be the last step.

Example: ``{"method": "quantize.fixed_point", "params": {"frac_bits": 7, "bits": 8}}``
"""

from __future__ import annotations

from pydantic import Field

from core.methods import ModelInfo, StrictParams, register
from core.methods._ct import CT_CONSTRAINTS, check_model


class QuantizeFixedPointParams(StrictParams):
    # strict: true/"7"/7.5 are errors, not 1/7/7.
    frac_bits: int = Field(strict=True, ge=0, le=16, description="fractional bits n: the grid step is 2^-n")
    bits: int = Field(default=8, strict=True, ge=2, le=8, description="total integer width, sign included")


def _check(params: QuantizeFixedPointParams, info: ModelInfo) -> None:
    check_model("quantize.fixed_point", info)


register(
    "quantize.fixed_point",
    params=QuantizeFixedPointParams,
    summary="Fixed-point weights round(w * 2^n) / 2^n in `bits` bits, clipped, packed (compressed-tensors).",
    formats=("hf",),
    check=_check,
    final=True,
    streams=True,
    constraints=CT_CONSTRAINTS,
)
