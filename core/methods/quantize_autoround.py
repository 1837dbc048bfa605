"""``quantize.autoround``: AutoRound (Cheng et al., 2024, "Optimize Weight Rounding via Signed
Gradient Descent for the Quantization of LLMs", EMNLP 2024 Findings, arXiv:2309.05516).

Learns, layer by layer on calibration data, how to round each weight (up or down) and how far to
clip each group's range, by signed gradient descent on the difference between the quantized
decoder layer's outputs and the original's: the paper reports it closer to the original than GPTQ
at 4 bits on most models, for more compute.

Runs through llm-compressor's ``AutoRoundModifier`` (Intel's ``auto-round``) with its sequential
pipeline (one decoder layer at a time), on CPU and GPU workers alike (on a worker with a GPU the
layer being tuned runs there). Parameters: ``scheme`` ``W4A16`` (4-bit weights; default groups of
128) or ``W8A16`` (8-bit weights, per channel); ``group_size`` 32/64/128 or null (per channel);
``iters``: tuning steps per decoder layer, 200 by default (the paper's and llm-compressor's
default; auto-round's own "light" recipe uses 50); ``ignore``: modules kept in float
(``["lm_head"]`` by default); ``num_samples`` and ``max_length`` of the calibration texts (the
job's ``dataset_id``, which this method needs: a job without one is refused at submit).

Cost: each step runs the layer forward and backward on a batch of 8 calibration texts, so the time
grows with ``iters`` x ``max_length`` x the number of layers. On 2 busy CPU cores a layer of
Gemma 3 270M (hidden 640) took about 2 s a step with texts of 128 tokens, plus about 20 s of
set-up: at the defaults (200 steps, 512 tokens) a model of that size takes hours on such a CPU. The
job's plan estimates it.

AutoRound keeps in float the layers whose weight has a dimension that is not a multiple of 32 (its
kernels' rule); the metrics list them (``unquantized_layers``), and a model with no layer it can
quantize is refused. The artifact is a compressed-tensors ``pack-quantized`` checkpoint that
``AutoModel*.from_pretrained`` loads with compressed-tensors installed. Must be the last step.
Refused at submit: bare state dicts, models without tokenizer files, GPT-2-style Conv1D models,
already-quantized models. A layer whose input width the group size does not divide gets the
largest of 32/64/128 below it that does, or per-channel scales (``group_fallbacks`` in the
metrics); ``strict_group_size: true`` refuses such a model instead.

Example: ``{"method": "quantize.autoround", "params": {"scheme": "W4A16", "group_size": 128, "iters": 200}}``
with a ``dataset_id``.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import Field

from core.methods import MethodConstraint, ModelInfo, Refusal, register
from core.methods._ct import GROUP_DIVIDES, NOT_LINEAR_PATTERNS, ignored
from core.methods._llmc import QUANTIZE_CONSTRAINTS, QuantizeParams, check_group, check_model

# The paper's and llm-compressor's default (AutoRoundModifier.iters).
DEFAULT_ITERS = 200
# auto-round quantizes integer weights (without activation quantization) only where both
# dimensions of a layer's weight are multiples of this (auto_round/compressors/layer_config_resolver.py).
SHAPE_MULTIPLE = 32

MULTIPLES_OF_32 = MethodConstraint(
    id="autoround_multiples_of_32",
    rule=(
        "AutoRound quantizes a layer only where both dimensions of its weight are multiples of 32; the "
        "others stay in float and the step's metrics list them (unquantized_layers). A model none of whose "
        "layers has that shape is refused."
    ),
    values={"multiple": SHAPE_MULTIPLE},
)
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


class QuantizeAutoRoundParams(QuantizeParams):
    scheme: Literal["W4A16", "W8A16"] = "W4A16"
    iters: int = Field(
        default=DEFAULT_ITERS,
        ge=1,
        le=10_000,
        description="signed-gradient tuning steps per decoder layer (each a forward and backward pass "
        "of the layer on a batch of 8 calibration texts): the job's time grows with it",
    )


def _check(params: QuantizeAutoRoundParams, info: ModelInfo) -> None:
    check_model("quantize.autoround", info, quantizes=True)
    check_group("quantize.autoround", info, params, params.scheme)
    shapes = _linear_shapes(info, params.ignore)
    if shapes and not any(o % SHAPE_MULTIPLE == 0 and i % SHAPE_MULTIPLE == 0 for o, i in shapes.values()):
        name, (o, i) = next(iter(shapes.items()))
        raise Refusal(
            f"quantize.autoround would leave every layer in float: AutoRound quantizes a layer only where both "
            f"dimensions of its weight are multiples of {SHAPE_MULTIPLE}, and none of this model's is (e.g. "
            f"{name}: {o} x {i}); use quantize.gptq or quantize.weight_only",
            constraint=MULTIPLES_OF_32.id,
        )


def _linear_shapes(info: ModelInfo, ignore: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every layer the step quantizes, from the safetensors headers (empty when they
    are not known: the worker checks again on the loaded model)."""
    if info.tensors is None:
        return {}
    try:
        tensors = info.tensors()
    except (OSError, ValueError):
        return {}
    return {
        t.name.removesuffix(".weight"): (t.shape[0], t.shape[1])
        for t in tensors
        if len(t.shape) == 2
        and t.dtype in _FLOAT_DTYPES
        and t.name.endswith(".weight")
        and not any(fnmatch.fnmatch(t.name, p) for p in NOT_LINEAR_PATTERNS)
        and not ignored(t.name.removesuffix(".weight"), ignore)
    }


register(
    "quantize.autoround",
    params=QuantizeAutoRoundParams,
    summary="AutoRound: rounding and clipping learned by signed gradient descent, block by block (llm-compressor).",
    needs_data=True,
    formats=("hf",),
    check=_check,
    final=True,
    # Not on the block path (weights left on disk): llm-compressor 0.14's AutoRoundModifier lifts
    # the offloading of the layer it tunes and puts it back, which compressed-tensors' disk offload
    # cannot take (the re-offloaded weights are not in its index: tests/test_autoround.py). The
    # model is loaded whole; on a GPU worker the sequential pipeline onloads one layer at a time.
    constraints=[GROUP_DIVIDES, MULTIPLES_OF_32, *QUANTIZE_CONSTRAINTS],
)
