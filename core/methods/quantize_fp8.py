"""``quantize.fp8``: 8-bit floating-point weights (float8 e4m3), the format vLLM serves on Hopper,
Ada and Blackwell GPUs (llm-compressor's FP8 schemes).

``scheme``:

- ``FP8_DYNAMIC`` (default): one scale per output channel for the weights; activations quantized
  per token at run time. Data-free.
- ``FP8_BLOCK``: one scale per 128x128 block of weights (DeepSeek-V3 style; edge blocks along
  the output dimension may be partial); activations quantized at run time in groups of 128 input
  columns, so every quantized layer's input width must be a multiple of 128 (refused at submit
  otherwise, naming the layers: ``ignore`` them, or use ``FP8_DYNAMIC``). Data-free.
- ``FP8``: one scale per weight tensor, and a static per-tensor activation scale calibrated on the
  job's dataset (``dataset_id``, ``num_samples`` texts of at most ``max_length`` tokens, tokenized
  with the model's tokenizer): the job needs a dataset, and the model its tokenizer files.

``ignore``: modules left in float (``["lm_head"]`` by default; names, name suffixes or
``re:<regex>`` patterns). The LM head always stays in float (vLLM serves FP8 checkpoints with a
float head). Embeddings, norms and biases too.

The data-free schemes run through the streaming engine (tensor by tensor from the input shards,
so models larger than the worker's memory work), with llm-compressor's model-free observers; a
weight is quantized whole (FP8_BLOCK's blocks span rows), so memory follows the largest quantized
weight. The in-memory path (``oneshot`` with ``QuantizationModifier``) writes the same bytes.
``FP8`` runs through ``oneshot``'s sequential pipeline with the whole model in memory.

The artifact is a compressed-tensors ``float-quantized`` checkpoint: ``weight`` in float8_e4m3fn
plus ``weight_scale`` (and ``input_scale`` for ``FP8``), ``quantization_config`` in config.json.
vLLM loads it and runs FP8 matmuls where the GPU has them. transformers loads it on a CPU by
dequantizing the weights to their float dtype (no FP8 kernel runs; activations are quantized and
dequantized in floating point as the scheme says): the report's quality figures on a CPU worker are
those of the dequantized weights, and it says so.
Storage: one byte a weight (half of bf16) plus the scales.

Refused at submit: GPT-2-style Conv1D models, already-quantized models, bare state dicts; for
``FP8``, models without tokenizer files. Must be the last step.

Example: ``{"method": "quantize.fp8", "params": {"scheme": "FP8_DYNAMIC"}}``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from pydantic import Field

from core.methods import MethodConstraint, ModelInfo, Refusal, register
from core.methods._ct import CT_CONSTRAINTS, check_model
from core.methods._llmc import CalibrationParams
from core.methods._llmc import check_model as llmc_check_model

FP8_SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK", "FP8")
# Schemes without calibration: the streaming engine runs them (worker/stream/fp.py).
DATA_FREE = frozenset({"FP8_DYNAMIC", "FP8_BLOCK"})
# Input columns per activation group, by scheme: every quantized layer's input width must be a
# multiple (compressed-tensors' dynamic group quantization reshapes the activations by it).
INPUT_GROUP = {"FP8_BLOCK": 128}


class QuantizeFP8Params(CalibrationParams):
    scheme: Literal["FP8_DYNAMIC", "FP8_BLOCK", "FP8"] = Field(
        default="FP8_DYNAMIC",
        description="FP8_DYNAMIC: per-channel weights, per-token dynamic activations (data-free); "
        "FP8_BLOCK: 128x128 weight blocks (data-free); FP8: static activation scales calibrated on the dataset",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=64,
        description="modules left in float: names, or 're:<regex>' patterns (the LM head always is)",
    )


SCHEME = MethodConstraint(
    id="fp8_scheme",
    rule=(
        "scheme FP8_DYNAMIC or FP8_BLOCK is data-free and streams; FP8 calibrates static activation scales "
        "and needs the job's dataset_id and the model's tokenizer files."
    ),
    params=("scheme",),
    values={
        "schemes": list(get_args(QuantizeFP8Params.model_fields["scheme"].annotation)),
        "data_free": sorted(DATA_FREE),
    },
)


BLOCK_WIDTH = MethodConstraint(
    id="fp8_block_divides_inputs",
    rule=(
        "Scheme FP8_BLOCK quantizes activations in groups of 128 input columns: every quantized Linear "
        "layer's input width must be a multiple of 128. A refusal lists the blocking layers (blocking_layers); "
        "add them to ignore, or use FP8_DYNAMIC."
    ),
    params=("scheme", "ignore"),
    values={"group_size": 128},
)


def scheme_width_refusal(method: str, scheme: str, widths: Mapping[str, int]) -> Refusal | None:
    """The refusal of an FP8 or FP4 scheme whose groups do not divide some of the layers' input
    widths (``widths``: module name -> in_features), or None: at submit and in the worker."""
    from core.methods.quantize_fp4 import GROUP, width_refusal

    if scheme in INPUT_GROUP:
        return width_refusal(
            method, scheme, INPUT_GROUP[scheme], widths, what="quantizes activations", constraint=BLOCK_WIDTH.id
        )
    return width_refusal(method, scheme, GROUP.get(scheme), widths)


def _check(params: QuantizeFP8Params, info: ModelInfo) -> None:
    from core.methods.quantize_fp4 import input_widths

    if params.scheme not in DATA_FREE:
        llmc_check_model("quantize.fp8", info, quantizes=True)
    check_model("quantize.fp8", info, None, params.ignore)
    refusal = scheme_width_refusal("quantize.fp8", params.scheme, input_widths(info, params.ignore))
    if refusal is not None:
        raise refusal


register(
    "quantize.fp8",
    params=QuantizeFP8Params,
    summary="FP8 (e4m3) weights, per channel or 128x128 blocks, dynamic or calibrated activations (vLLM).",
    formats=("hf",),
    check=_check,
    final=True,
    streams=True,
    needs_data_when=lambda params: params.scheme not in DATA_FREE,
    constraints=[SCHEME, BLOCK_WIDTH, *CT_CONSTRAINTS],
)
