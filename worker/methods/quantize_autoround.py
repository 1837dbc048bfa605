"""``quantize.autoround``: the handler (core/methods/quantize_autoround.py has the method's
parameters, checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.quantize_autoround import QuantizeAutoRoundParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@handler("quantize.autoround")
def quantize_autoround(model: LoadedModel, params: QuantizeAutoRoundParams, ctx: MethodContext) -> Metrics:
    """AutoRound: rounding and clipping learned by signed gradient descent (llm-compressor)."""
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    from core.methods._ct import describe_fallbacks
    from worker import llmc

    if model.module is None:
        raise ValueError("quantize.autoround needs a transformers model directory (config.json)")
    kept = float_layers(model.module, params.ignore)
    if kept and len(kept) == len(_targets(model.module, params.ignore)):
        raise ValueError(
            "quantize.autoround would leave every layer in float: AutoRound quantizes integer weights only "
            f"where both dimensions are multiples of 32, and no layer of this model has that shape (e.g. {kept[0]}); "
            "use quantize.gptq or quantize.weight_only"
        )
    group = params.effective_group(params.scheme)
    fallbacks = llmc.group_fallbacks(model, "quantize.autoround", group, params)
    mod = AutoRoundModifier(
        config_groups=llmc.config_groups(params.scheme, group, fallbacks),
        ignore=params.ignore,
        iters=params.iters,
        # Not llm-compressor's default: torch.compile of the tuning loop needs a C++ toolchain on a
        # CPU worker and Triton on a GPU one, and a compile failure would fail the job; auto-round
        # puts the gain at about 20 % of the tuning time. Eager everywhere, the path the tests run.
        enable_torch_compile=False,
    )
    run = llmc.run_oneshot(model, ctx, [mod], params)
    llmc.set_quantized_saver(model, "quantize.autoround")
    return {
        "scheme": params.scheme,
        "group_size": group,
        "group_fallbacks": describe_fallbacks(fallbacks),
        "iters": params.iters,
        "ignore": params.ignore,
        "unquantized_layers": unquantized_layers(model.module, params.ignore),
        "unquantized_reason": "AutoRound keeps in float the layers whose weight has a dimension that is not a "
        "multiple of 32",
        **run,
    }


def _targets(module: Any, ignore: list[str]) -> list[tuple[str, Any]]:
    """The Linear layers the step quantizes: every one but ``ignore`` (the LM head by default)."""
    import torch

    from core.methods._ct import ignored

    return [
        (name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and not ignored(name, ignore)
    ]


def float_layers(module: Any, ignore: list[str]) -> list[str]:
    """The layers AutoRound will keep in float: for integer weights without activation quantization
    (W4A16, W8A16) auto-round quantizes a layer only where both dimensions of its weight are
    multiples of 32 (auto_round/compressors/layer_config_resolver.py, its kernels' rule)."""
    return sorted(name for name, m in _targets(module, ignore) if m.weight.shape[0] % 32 or m.weight.shape[1] % 32)


def unquantized_layers(module: Any, ignore: list[str]) -> list[str]:
    """After the run, the Linear layers the step was to quantize that stayed in float (AutoRound
    cleared their quantization scheme, so the artifact lists them in ``ignore``): what
    :func:`float_layers` predicted, read from the model."""
    return sorted(name for name, m in _targets(module, ignore) if getattr(m, "quantization_scheme", None) is None)
