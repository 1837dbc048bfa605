"""``quantize.dynamic_int8``: the study's dynamic int8 (W8A8), saved as compressed-tensors.

Weights: int8, symmetric, one scale per output channel, round-to-nearest
(``scale = max|w_row| / 127.5``, see worker/ops/quant.py). Activations: int8, symmetric, quantized
at run time **per token** (dynamic, strategy ``token``): each token's input row gets its own scale,
because a single per-tensor activation scale loses badly on real LLMs (a few outlier tokens set
the range for all). This is compressed-tensors' ``INT8_W8A8`` preset; the checkpoint is
``int-quantized`` (int8 ``weight`` + ``weight_scale`` per Linear) and loads with
``AutoModel*.from_pretrained`` wherever compressed-tensors is installed.

Targets every ``nn.Linear`` except the LM head (``ignore`` list); embeddings (``nn.Embedding``),
norms and biases stay in the model's float dtype. GPT-2-style models (transformers ``Conv1D``)
and bare safetensors state dicts are refused at submit. It must be the last step: the weights
leave packed.

How it runs: transformers on CPU dequantizes the int8 weights on the first forward and simulates
the per-token activation quantization in floating point; real int8 GEMMs need a serving engine
with compressed-tensors W8A8 kernels. The step metrics and the artifact notes say so.

Example: ``{"method": "quantize.dynamic_int8", "params": {}}``
"""

from __future__ import annotations

from core.methods import ModelInfo, StrictParams, register
from core.methods._ct import CT_CONSTRAINTS, check_model


class QuantizeDynamicInt8Params(StrictParams):
    pass


def _check(params: QuantizeDynamicInt8Params, info: ModelInfo) -> None:
    check_model("quantize.dynamic_int8", info)


register(
    "quantize.dynamic_int8",
    params=QuantizeDynamicInt8Params,
    summary="Dynamic int8 (W8A8): per-channel int8 weights, per-token int8 activations at run time.",
    formats=("hf",),
    check=_check,
    final=True,
    streams=True,
    constraints=CT_CONSTRAINTS,
)
