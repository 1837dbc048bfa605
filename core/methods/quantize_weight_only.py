"""``quantize.weight_only``: round-to-nearest integer weights (int8 or int4), float activations.

``bits``: 8 or 4. ``group_size``: null (default) for one scale per output channel, or 32/64/128
for one scale (and zero point, if asymmetric) per group of that many consecutive input columns.
A layer whose input width is not a multiple of it gets the largest of 32/64/128 below it that
divides its width, or per-channel scales where none does (a config group of its own in the
artifact; the step's metrics list each such layer under ``group_fallbacks``).
``strict_group_size: true`` refuses such a model at submit instead, naming the blocking layers and
the group sizes that would work (docs/METHODS.md).
``symmetric`` (default true): zero point 0 and ``scale = max|w| / ((2^b - 1) / 2)``; false fits
``[min, max]`` with an int8 zero point per row/group. Rounding is to nearest
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

from typing import Literal, get_args

from pydantic import Field

from core.methods import MethodConstraint, ModelInfo, StrictParams, register
from core.methods._ct import CT_CONSTRAINTS, GROUP_DIVIDES, STRICT_GROUP_SIZE_DESCRIPTION, check_model


class QuantizeWeightOnlyParams(StrictParams):
    bits: Literal[8, 4] = Field(description="integer width of the stored weights")
    group_size: Literal[32, 64, 128] | None = Field(
        default=None, description="input columns per scale; null: one scale per output channel"
    )
    symmetric: bool = Field(
        default=True, strict=True, description="zero point 0 (true) or a fitted zero point per row/group"
    )
    strict_group_size: bool = Field(default=False, strict=True, description=STRICT_GROUP_SIZE_DESCRIPTION)


def _check(params: QuantizeWeightOnlyParams, info: ModelInfo) -> None:
    check_model("quantize.weight_only", info, params.group_size, strict_group_size=params.strict_group_size)


BITS = MethodConstraint(
    id="bits",
    rule="bits is 8 (int8) or 4 (int4, two weights a byte); activations stay in float.",
    params=("bits",),
    values={"bits": list(get_args(QuantizeWeightOnlyParams.model_fields["bits"].annotation))},
)


register(
    "quantize.weight_only",
    params=QuantizeWeightOnlyParams,
    summary="Round-to-nearest int8/int4 weights, per channel or per group, packed (compressed-tensors).",
    formats=("hf",),
    check=_check,
    final=True,
    streams=True,
    constraints=[BITS, GROUP_DIVIDES, *CT_CONSTRAINTS],
)
