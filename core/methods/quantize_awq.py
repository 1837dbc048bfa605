"""``quantize.awq``: AWQ, activation-aware weight quantization (Lin et al., 2023, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration", arXiv:2306.00978).

About 1% of weight channels matter far more than the rest: those that multiply large activations.
AWQ searches, per layer and on calibration data, the per-channel scales that protect them before
4-bit group quantization (W4A16), without mixed precision.

Runs through llm-compressor's ``AWQModifier`` followed by its ``QuantizationModifier`` (W4A16,
``group_size`` 128 by default), sequential pipeline, on CPU and GPU workers alike: jobs go to the
``cpu`` queue like the other calibrated methods, and a worker that serves it with a GPU
(``modelpress worker --queues cpu,gpu``) runs the layer being searched on the GPU. On a CPU its
cost is of GPTQ's order: for each norm->projection mapping its scale search runs the calibration
texts through the mapping's module (an attention or MLP block) once per candidate scale (20
candidates), so it grows with ``num_samples`` x ``max_length`` (measured on 2 layers of Gemma 3
270M with 16 texts of 128 tokens: 0.75x GPTQ's time on the same machine); the job's plan estimates
it. The scale search needs the architecture's norm→projection mappings: the architectures
llm-compressor has them for (Llama, Mistral, Qwen2/3, Gemma 2/3, Granite, Phi-3, ...); others,
bare state dicts, models without tokenizer files and already-quantized models are refused at
submit. Must be the last step; the artifact is a compressed-tensors ``pack-quantized`` checkpoint.

Example: ``{"method": "quantize.awq", "params": {"group_size": 128}}`` with a ``dataset_id``.
"""

from __future__ import annotations

from typing import Literal

from core.methods import ModelInfo, Refusal, register
from core.methods._ct import GROUP_DIVIDES
from core.methods._llmc import QUANTIZE_CONSTRAINTS, QuantizeParams, architecture_constraint, check_group, check_model

# Architectures with AWQ mappings in llm-compressor 0.14 (a test checks each is in its registry).
SUPPORTED = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GraniteForCausalLM",
        "Phi3ForCausalLM",
        "BloomForCausalLM",
        "CohereForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
    }
)


class QuantizeAWQParams(QuantizeParams):
    scheme: Literal["W4A16"] = "W4A16"


def _check(params: QuantizeAWQParams, info: ModelInfo) -> None:
    check_model("quantize.awq", info, quantizes=True)
    check_group("quantize.awq", info, params, "W4A16")
    if info.architecture not in SUPPORTED:
        raise Refusal(
            f"quantize.awq has no scale-search mappings for {info.architecture or 'this model'} "
            f"(supported: {', '.join(sorted(SUPPORTED))}); use quantize.gptq",
            constraint=ARCHITECTURES.id,
        )


ARCHITECTURES = architecture_constraint("quantize.awq", SUPPORTED, "scale-search mappings (norm -> projections)")


register(
    "quantize.awq",
    params=QuantizeAWQParams,
    summary="AWQ: activation-aware scales, then 4-bit group quantization (llm-compressor; CPU or GPU).",
    needs_data=True,
    formats=("hf",),
    check=_check,
    final=True,
    blocks=True,
    constraints=[GROUP_DIVIDES, ARCHITECTURES, *QUANTIZE_CONSTRAINTS],
)
