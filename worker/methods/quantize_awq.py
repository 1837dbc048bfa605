"""``quantize.awq``: the handler (core/methods/quantize_awq.py has the method's parameters, checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.methods.quantize_awq import QuantizeAWQParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@handler("quantize.awq")
def quantize_awq(model: LoadedModel, params: QuantizeAWQParams, ctx: MethodContext) -> Metrics:
    """AWQ: activation-aware scales, then 4-bit group quantization (llm-compressor; GPU)."""
    # The transform module's AWQModifier (the scale search alone): the old import path is a shim that
    # returns its own QuantizationModifier too, with no scheme, which refuses to initialize.
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from core.methods._ct import describe_fallbacks
    from worker import llmc

    group = params.effective_group("W4A16")
    fallbacks = llmc.group_fallbacks(model, "quantize.awq", group, params)
    groups = llmc.config_groups("W4A16", group, fallbacks)
    recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=params.ignore)]
    run = llmc.run_oneshot(model, ctx, recipe, params)
    llmc.set_quantized_saver(model, "quantize.awq")
    return {
        "scheme": "W4A16",
        "group_size": group,
        "group_fallbacks": describe_fallbacks(fallbacks),
        "ignore": params.ignore,
        **run,
    }
