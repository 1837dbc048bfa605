"""``quantize.weight_only``: round-to-nearest integer weights (int8 or int4), float activations.

``bits``: 8 or 4. ``group_size``: null (default) for one scale per output channel, or 32/64/128
for one scale (and zero point, if asymmetric) per group of that many consecutive input columns;
every Linear input width must be a multiple of it (refused at submit when the config shows it is
not). ``symmetric`` (default true): zero point 0 and ``scale = max|w| / ((2^b - 1) / 2)``; false
fits ``[min, max]`` with an int8 zero point per row/group. Rounding is to nearest
(worker/ops/quant.py): ``|w - w'| <= scale / 2`` for every weight. No calibration data.

Saved as compressed-tensors ``pack-quantized`` (the format it and llm-compressor use for W4A16 /
W8A16): the integers are packed densely into int32 words, so 4-bit weights take half a byte,
plus ``weight_scale`` (and ``weight_zero_point``) tensors and ``weight_shape``. The checkpoint
loads with ``AutoModel*.from_pretrained`` wherever compressed-tensors is installed; on CPU the
weights are dequantized on the first forward (see the step's ``runs``).

Targets every ``nn.Linear`` except the LM head (``ignore`` list); embeddings, norms and biases
stay in the model's float dtype. GPT-2-style models (transformers ``Conv1D``) and bare
safetensors state dicts are refused at submit. It must be the last step.

Example: ``{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}``
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from worker.methods import ModelInfo, StrictParams, register


class QuantizeWeightOnlyParams(StrictParams):
    bits: Literal[8, 4] = Field(description="integer width of the stored weights")
    group_size: Literal[32, 64, 128] | None = Field(
        default=None, description="input columns per scale; null: one scale per output channel"
    )
    symmetric: bool = Field(default=True, strict=True, description="zero point 0 (true) or a fitted zero point per row/group")


def _check(params: QuantizeWeightOnlyParams, info: ModelInfo) -> None:
    from worker.ct_format import check_model

    check_model("quantize.weight_only", info, params.group_size)


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

    return QuantizeStep("quantize.weight_only", _weights(params), None,
                        lambda w: quant.rtn_qparams(w, params.bits, params.group_size, params.symmetric), _scheme(params))


@register("quantize.weight_only", params=QuantizeWeightOnlyParams, formats=("hf",), check=_check, final=True, stream=_stream)
def quantize_weight_only(model: Any, params: QuantizeWeightOnlyParams, ctx: Any) -> dict[str, Any]:
    """Round-to-nearest int8/int4 weights, per channel or per group, packed (compressed-tensors)."""
    from worker.ct_format import quantize_linear_layers
    from worker.ops import quant

    weights = _weights(params)
    metrics = quantize_linear_layers(
        model,
        method="quantize.weight_only",
        weights=weights,
        input_activations=None,
        qparams=lambda w: quant.rtn_qparams(w, params.bits, params.group_size, params.symmetric),
        ctx=ctx,
    )
    return {"scheme": _scheme(params), **metrics}
