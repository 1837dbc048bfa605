"""``quantize.awq``: the handler (core/methods/quantize_awq.py has the method's parameters, checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.quantize_awq import QuantizeAWQParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@handler("quantize.awq")
def quantize_awq(model: LoadedModel, params: QuantizeAWQParams, ctx: MethodContext) -> Metrics:
    """AWQ: activation-aware scales, then 4-bit group quantization (llm-compressor; CPU or GPU)."""
    # The transform module's AWQModifier (the scale search alone): the old import path is a shim that
    # returns its own QuantizationModifier too, with no scheme, which refuses to initialize.
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from core.methods._ct import describe_fallbacks
    from worker import llmc

    _no_pinning_without_accelerator()
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


def _no_pinning_without_accelerator() -> None:
    """Let AWQ run on a CPU worker. llm-compressor 0.14's AWQ pins each layer's cached calibration
    inputs in page-locked memory before its scale search, for faster copies to a GPU; without an
    accelerator torch cannot pin memory ("Cannot access accelerator device when none is
    available") and the job would fail. The tensors are already where the search runs, so on a
    CPU pinning is skipped; with an accelerator the library's own pinning runs unchanged. Patched
    on the class once per process (idempotent, the same for concurrent jobs in a thread pool)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    pin = IntermediatesCache.pin_memory
    if getattr(pin, "_modelpress_cpu_safe", False):
        return

    def pin_memory(self: IntermediatesCache, *args: Any, **kwargs: Any) -> None:
        if torch.accelerator.is_available():
            pin(self, *args, **kwargs)

    pin_memory._modelpress_cpu_safe = True  # type: ignore[attr-defined]
    IntermediatesCache.pin_memory = pin_memory  # type: ignore[method-assign]
