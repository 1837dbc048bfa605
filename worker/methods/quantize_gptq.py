"""``quantize.gptq``: the handler (core/methods/quantize_gptq.py has the method's parameters,
checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.methods.quantize_gptq import QuantizeGPTQParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@handler("quantize.gptq")
def quantize_gptq(model: LoadedModel, params: QuantizeGPTQParams, ctx: MethodContext) -> Metrics:
    """GPTQ: error-compensating integer quantization on calibration data (llm-compressor)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    from core.methods._ct import describe_fallbacks
    from worker import llmc

    group = params.effective_group(params.scheme)
    fallbacks = llmc.group_fallbacks(model, "quantize.gptq", group, params)
    mod = GPTQModifier(
        config_groups=llmc.config_groups(params.scheme, group, fallbacks, params.observer),
        ignore=params.ignore,
        dampening_frac=params.dampening_frac,
        actorder=params.actorder,
    )
    run = llmc.run_oneshot(model, ctx, [mod], params)
    llmc.set_quantized_saver(model, "quantize.gptq")
    return {
        "scheme": params.scheme,
        "group_size": group,
        "group_fallbacks": describe_fallbacks(fallbacks),
        "actorder": params.actorder,
        "observer": params.observer,
        "ignore": params.ignore,
        **run,
    }
