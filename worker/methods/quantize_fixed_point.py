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

import threading

from typing import Any

from pydantic import Field

from worker.methods import ModelInfo, StrictParams, register


class QuantizeFixedPointParams(StrictParams):
    # strict: true/"7"/7.5 are errors, not 1/7/7.
    frac_bits: int = Field(strict=True, ge=0, le=16, description="fractional bits n: the grid step is 2^-n")
    bits: int = Field(default=8, strict=True, ge=2, le=8, description="total integer width, sign included")


def _check(params: QuantizeFixedPointParams, info: ModelInfo) -> None:
    from worker.ct_format import check_model

    check_model("quantize.fixed_point", info)


def _weights(bits: int) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}


def _qparams(n: int) -> Any:
    """Every row's scale is 2^-n (zero point 0)."""
    import torch

    from worker.ops import quant

    def qparams(w: Any) -> tuple[Any, Any]:
        rows = w.shape[0]
        return torch.full((rows, 1), quant.fixed_point_scale(n)), torch.zeros((rows, 1), dtype=torch.int8)

    return qparams


def _summary(n: int, bits: int, clipped: int, total: int) -> dict[str, Any]:
    from worker.ops import quant

    qmin, qmax = quant.int_range(bits)
    return {
        "scheme": f"W{bits}A16 fixed-point",
        "frac_bits": n,
        "scale": quant.fixed_point_scale(n),
        "representable_range": [qmin * quant.fixed_point_scale(n), qmax * quant.fixed_point_scale(n)],
        "clipped": clipped,
        "clipped_fraction": clipped / total if total else 0.0,
    }


def _stream(params: QuantizeFixedPointParams, ctx: Any) -> Any:
    from worker.ops import quant
    from worker.stream.steps import QuantizeStep

    n, bits = params.frac_bits, params.bits
    counts = {"clipped": 0, "total": 0}
    lock = threading.Lock()  # the step calls qparams from one thread per core
    rows_qparams = _qparams(n)

    def qparams(w: Any) -> tuple[Any, Any]:
        # Clipping is counted on the floats as they stream by (the stored integers no longer show it).
        clipped = quant.fixed_point(w, n, bits)[1]
        with lock:
            counts["clipped"] += clipped
            counts["total"] += w.numel()
        return rows_qparams(w)

    summary = lambda: _summary(n, bits, counts["clipped"], counts["total"])  # noqa: E731
    return QuantizeStep("quantize.fixed_point", _weights(bits), None, qparams, f"W{bits}A16 fixed-point", extra=summary)


@register("quantize.fixed_point", params=QuantizeFixedPointParams, formats=("hf",), check=_check, final=True, stream=_stream)
def quantize_fixed_point(model: Any, params: QuantizeFixedPointParams, ctx: Any) -> dict[str, Any]:
    """Fixed-point weights round(w * 2^n) / 2^n in `bits` bits, clipped, packed (compressed-tensors)."""
    from worker.ct_format import quantize_linear_layers
    from worker.ops import quant

    n, bits = params.frac_bits, params.bits
    # Clipping is counted before quantizing (the stored integers no longer show it).
    clipped = total = 0
    for t in model.targets():
        if t.weight.is_floating_point():
            clipped += quant.fixed_point(t.weight, n, bits)[1]
            total += t.weight.numel()

    metrics = quantize_linear_layers(
        model,
        method="quantize.fixed_point",
        weights=_weights(bits),
        input_activations=None,
        qparams=_qparams(n),
        ctx=ctx,
    )
    return {**_summary(n, bits, clipped, total), **metrics}
