"""``quantize.smoothquant``: the handler (core/methods/quantize_smoothquant.py has the method's
parameters, checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.methods.quantize_smoothquant import QuantizeSmoothQuantParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@handler("quantize.smoothquant")
def quantize_smoothquant(model: LoadedModel, params: QuantizeSmoothQuantParams, ctx: MethodContext) -> Metrics:
    """SmoothQuant: migrate activation outliers into the weights, then W8A8 (llm-compressor)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    from worker import llmc

    groups = llmc.config_groups("W8A8", None)
    quant = (
        GPTQModifier(config_groups=groups, ignore=params.ignore)
        if params.quantizer == "gptq"
        else QuantizationModifier(config_groups=groups, ignore=params.ignore)
    )
    run = llmc.run_oneshot(
        model, ctx, [SmoothQuantModifier(smoothing_strength=params.smoothing_strength), quant], params
    )
    llmc.set_quantized_saver(model, "quantize.smoothquant")
    return {
        "scheme": "W8A8",
        "smoothing_strength": params.smoothing_strength,
        "quantizer": params.quantizer,
        "ignore": params.ignore,
        **run,
    }
