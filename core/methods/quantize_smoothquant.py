"""``quantize.smoothquant``: SmoothQuant (Xiao et al., 2022, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", arXiv:2211.10438), then W8A8.

LLM activations have a few outlier channels that make per-tensor int8 activations lossy. SmoothQuant
moves that difficulty into the weights: each input channel j is divided by
``s_j = max|X_j|^α / max|W_j|^(1−α)`` in the preceding norm and multiplied back into the following
Linear weights, an exact rewrite in float that leaves activations easier to quantize. ``α`` is
``smoothing_strength``. Then weights and activations are quantized to int8 (W8A8: per-channel
weights, per-token dynamic activations) with GPTQ (default) or round-to-nearest (``quantizer``
``"rtn"``).

Runs through llm-compressor's ``SmoothQuantModifier`` + ``GPTQModifier``/``QuantizationModifier``
(sequential pipeline). The smoothing needs to know which norm feeds which projections: supported
are the architectures llm-compressor has mappings for (Llama, Mistral, Qwen2/3, Gemma 2/3, Granite,
Mixtral, Phi-3, Bloom, Cohere); others are refused at submit, as are bare state dicts, models
without tokenizer files and already-quantized models. Must be the last step.

Example: ``{"method": "quantize.smoothquant", "params": {"smoothing_strength": 0.8}}`` with a ``dataset_id``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.methods import ModelInfo, Refusal, register
from core.methods._llmc import (
    QUANTIZE_CONSTRAINTS,
    W8A8_PER_CHANNEL,
    QuantizeParams,
    architecture_constraint,
    check_group,
    check_model,
)

# Architectures with SmoothQuant mappings in llm-compressor 0.14 (MAPPINGS_REGISTRY; a test checks
# each is there). Written out so that the API's submit check needs no torch.
SUPPORTED = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GraniteForCausalLM",
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "Phi3ForCausalLM",
        "BloomForCausalLM",
        "CohereForCausalLM",
    }
)


class QuantizeSmoothQuantParams(QuantizeParams):
    smoothing_strength: float = Field(
        default=0.8, gt=0, lt=1, description="α: how much of the activations' range moves into the weights"
    )
    scheme: Literal["W8A8"] = "W8A8"
    quantizer: Literal["gptq", "rtn"] = Field(default="gptq", description="how the smoothed weights are quantized")


def _check(params: QuantizeSmoothQuantParams, info: ModelInfo) -> None:
    check_model("quantize.smoothquant", info, quantizes=True)
    check_group("quantize.smoothquant", info, params, "W8A8")
    if info.architecture not in SUPPORTED:
        raise Refusal(
            f"quantize.smoothquant has no smoothing mappings for {info.architecture or 'this model'} "
            f"(supported: {', '.join(sorted(SUPPORTED))}); use quantize.gptq with scheme W8A8",
            constraint=ARCHITECTURES.id,
        )


ARCHITECTURES = architecture_constraint("quantize.smoothquant", SUPPORTED, "smoothing mappings (norm -> projections)")


register(
    "quantize.smoothquant",
    params=QuantizeSmoothQuantParams,
    summary="SmoothQuant: migrate activation outliers into the weights, then W8A8 (llm-compressor).",
    needs_data=True,
    formats=("hf",),
    check=_check,
    final=True,
    blocks=True,
    constraints=[W8A8_PER_CHANNEL, ARCHITECTURES, *QUANTIZE_CONSTRAINTS],
)
