"""``quantize.weight_only``: the handler (core/methods/quantize_weight_only.py has the method's
parameters, checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.quantize_weight_only import QuantizeWeightOnlyParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


def _weights(params: QuantizeWeightOnlyParams) -> dict[str, Any]:
    weights: dict[str, Any] = {"num_bits": params.bits, "type": "int", "symmetric": params.symmetric, "dynamic": False}
    if params.group_size is None:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=params.group_size)
    return weights


def _scheme(params: QuantizeWeightOnlyParams) -> str:
    return f"W{params.bits}A16" + ("" if params.symmetric else "-asym")


def _stream(params: QuantizeWeightOnlyParams, ctx: Any) -> Any:
    from worker.ops import quant
    from worker.stream.steps import QuantizeStep

    return QuantizeStep(
        "quantize.weight_only",
        _weights(params),
        None,
        lambda w, g: quant.rtn_qparams(w, params.bits, g, params.symmetric),
        _scheme(params),
        strict_group=params.strict_group_size,
        max_abs_qparams=(lambda m: quant.symmetric_qparams(m, params.bits)) if params.symmetric else None,
    )


@handler("quantize.weight_only", stream=_stream)
def quantize_weight_only(model: LoadedModel, params: QuantizeWeightOnlyParams, ctx: MethodContext) -> Metrics:
    """Round-to-nearest int8/int4 weights, per channel or per group, packed (compressed-tensors)."""
    from worker.ct_format import quantize_linear_layers
    from worker.ops import quant

    weights = _weights(params)
    metrics = quantize_linear_layers(
        model,
        method="quantize.weight_only",
        weights=weights,
        input_activations=None,
        qparams=lambda w, g: quant.rtn_qparams(w, params.bits, g, params.symmetric),
        ctx=ctx,
        strict_group=params.strict_group_size,
    )
    return {"scheme": _scheme(params), **metrics}
