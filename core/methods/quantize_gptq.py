"""``quantize.gptq``: GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323).

Quantizes each layer's weights column by column, updating the not-yet-quantized columns to
compensate the error, with the inverse Hessian of calibration inputs: at 4 bits it stays much
closer to the original than round-to-nearest (``quantize.weight_only``).

Runs through llm-compressor's ``GPTQModifier`` with its sequential pipeline (one decoder layer at
a time). Parameters: ``scheme`` ``W4A16`` (4-bit weights; default groups of 128), ``W8A16``
(8-bit weights, per channel) or ``W8A8`` (8-bit weights per channel and 8-bit activations
quantized per token at run time); ``group_size`` 32/64/128 or null (per channel); ``ignore``:
modules kept in float (``["lm_head"]`` by default); ``dampening_frac``; ``actorder``
(``"weight"``, the default and llm-compressor's: columns in decreasing Hessian diagonal, same
stored layout; null: left to right); ``observer`` (``"minmax"``, default, or ``"mse"``: each
scale searched for the least squared error); ``num_samples`` and ``max_length`` of the
calibration texts (the job's ``dataset_id``). The artifact is a
compressed-tensors checkpoint (``pack-quantized`` or ``int-quantized``) that
``AutoModel*.from_pretrained`` loads with compressed-tensors installed. Must be the last step.
Refused at submit: bare state dicts, models without tokenizer files, GPT-2-style Conv1D models,
already-quantized models. A layer whose input width the group size does not divide gets the
largest of 32/64/128 below it that does, or per-channel scales (``group_fallbacks`` in the
metrics); ``strict_group_size: true`` refuses such a model instead, naming the blocking layers
and the group sizes that would work (docs/METHODS.md).

Example: ``{"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 128}}`` with a ``dataset_id``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.methods import ModelInfo, register
from core.methods._ct import GROUP_DIVIDES
from core.methods._llmc import QUANTIZE_CONSTRAINTS, W8A8_PER_CHANNEL, QuantizeParams, check_group, check_model


class QuantizeGPTQParams(QuantizeParams):
    scheme: Literal["W4A16", "W8A16", "W8A8"] = "W4A16"
    dampening_frac: float = Field(
        default=0.01, gt=0, le=1, description="Hessian dampening, a fraction of its mean diagonal"
    )
    actorder: Literal["weight"] | None = Field(
        default="weight",
        description="column order: 'weight' quantizes columns in decreasing Hessian diagonal "
        "(activation ordering; the stored layout is unchanged, so kernels run it as usual); null: "
        "left to right",
    )
    observer: Literal["minmax", "mse"] = Field(
        default="minmax",
        description="how each group's scale is chosen: 'minmax' from the weights' range, 'mse' "
        "searched for the least squared rounding error (slower, often better at 4 bits)",
    )


def _check(params: QuantizeGPTQParams, info: ModelInfo) -> None:
    check_model("quantize.gptq", info, quantizes=True)
    check_group("quantize.gptq", info, params, params.scheme)


register(
    "quantize.gptq",
    params=QuantizeGPTQParams,
    summary="GPTQ: error-compensating integer quantization on calibration data (llm-compressor).",
    needs_data=True,
    formats=("hf",),
    check=_check,
    final=True,
    blocks=True,
    constraints=[GROUP_DIVIDES, W8A8_PER_CHANNEL, *QUANTIZE_CONSTRAINTS],
)
