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

from typing import Any

from worker.methods import ModelInfo, StrictParams, register


class QuantizeDynamicInt8Params(StrictParams):
    pass


def _check(params: QuantizeDynamicInt8Params, info: ModelInfo) -> None:
    from worker.ct_format import check_model

    check_model("quantize.dynamic_int8", info)


WEIGHTS = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
ACTIVATIONS = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}


def _stream(params: QuantizeDynamicInt8Params, ctx: Any) -> Any:
    from worker.ops import quant
    from worker.stream.steps import QuantizeStep

    return QuantizeStep("quantize.dynamic_int8", WEIGHTS, ACTIVATIONS, lambda w: quant.rtn_qparams(w, 8, None, True), "W8A8")


@register("quantize.dynamic_int8", params=QuantizeDynamicInt8Params, formats=("hf",), check=_check, final=True, stream=_stream)
def quantize_dynamic_int8(model: Any, params: QuantizeDynamicInt8Params, ctx: Any) -> dict[str, Any]:
    """Dynamic int8 (W8A8): per-channel int8 weights, per-token int8 activations at run time."""
    from worker.ct_format import quantize_linear_layers
    from worker.ops import quant

    metrics = quantize_linear_layers(
        model,
        method="quantize.dynamic_int8",
        weights=WEIGHTS,
        input_activations=ACTIVATIONS,
        qparams=lambda w: quant.rtn_qparams(w, 8, None, True),
        ctx=ctx,
    )
    return {"scheme": "W8A8", **metrics}
