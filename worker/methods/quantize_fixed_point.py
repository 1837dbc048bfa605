"""``quantize.fixed_point``: the handler (core/methods/quantize_fixed_point.py has the method's
parameters, checks and description)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from core.methods.quantize_fixed_point import QuantizeFixedPointParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


def _weights(bits: int) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}


def _qparams(n: int) -> Any:
    """Every row's scale is 2^-n (zero point 0)."""
    import torch

    from worker.ops import quant

    def qparams(w: Any, group: int | None = None) -> tuple[Any, Any]:
        # Per channel (group is always None here): one fixed scale per row.
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

    def qparams(w: Any, group: int | None) -> tuple[Any, Any]:
        # Clipping is counted on the floats as they stream by (the stored integers no longer show it).
        clipped = quant.fixed_point(w, n, bits)[1]
        with lock:
            counts["clipped"] += clipped
            counts["total"] += w.numel()
        return rows_qparams(w)

    summary = lambda: _summary(n, bits, counts["clipped"], counts["total"])  # noqa: E731
    return QuantizeStep("quantize.fixed_point", _weights(bits), None, qparams, f"W{bits}A16 fixed-point", extra=summary)


@handler("quantize.fixed_point", stream=_stream)
def quantize_fixed_point(model: LoadedModel, params: QuantizeFixedPointParams, ctx: MethodContext) -> Metrics:
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
