"""``quantize.dynamic_int8``: the handler (core/methods/quantize_dynamic_int8.py has the method's
parameters, checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.quantize_dynamic_int8 import QuantizeDynamicInt8Params
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


WEIGHTS = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
ACTIVATIONS = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}


def _stream(params: QuantizeDynamicInt8Params, ctx: Any) -> Any:
    from worker.ops import quant
    from worker.stream.steps import QuantizeStep

    return QuantizeStep(
        "quantize.dynamic_int8",
        WEIGHTS,
        ACTIVATIONS,
        lambda w, g: quant.rtn_qparams(w, 8, None, True),
        "W8A8",
        max_abs_qparams=lambda m: quant.symmetric_qparams(m, 8),
    )


@handler("quantize.dynamic_int8", stream=_stream)
def quantize_dynamic_int8(model: LoadedModel, params: QuantizeDynamicInt8Params, ctx: MethodContext) -> Metrics:
    """Dynamic int8 (W8A8): per-channel int8 weights, per-token int8 activations at run time."""
    from worker.ct_format import quantize_linear_layers
    from worker.ops import quant

    metrics = quantize_linear_layers(
        model,
        method="quantize.dynamic_int8",
        weights=WEIGHTS,
        input_activations=ACTIVATIONS,
        qparams=lambda w, g: quant.rtn_qparams(w, 8, None, True),
        ctx=ctx,
    )
    return {"scheme": "W8A8", **metrics}
