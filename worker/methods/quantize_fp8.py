"""``quantize.fp8``: the handler (core/methods/quantize_fp8.py has the method's parameters, checks
and description), and the in-memory run that quantize.fp4 shares.

In memory, llm-compressor's ``QuantizationModifier`` with the preset scheme runs through
``oneshot``: without data for the data-free schemes (weights observed, nothing run), on the job's
dataset (worker/llmc.py ``run_oneshot``) for those with static activation scales. The streaming
form (worker/stream/fp.py) writes the same checkpoint tensor by tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.quantize_fp8 import DATA_FREE, QuantizeFP8Params
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel

# What each scheme does to activations at run time (in vLLM; on a CPU they stay in float).
ACTIVATIONS = {
    "FP8_DYNAMIC": "fp8 dynamic per token",
    "FP8_BLOCK": "fp8 dynamic per group of 128",
    "FP8": "fp8 static per tensor (calibrated)",
    "NVFP4A16": None,
    "NVFP4": "fp4 dynamic per group of 16, calibrated global scale",
    "MXFP4A16": None,
    "MXFP4": "mxfp4 dynamic per group of 32",
}


def scheme_metrics(scheme: str, ignore: list[str]) -> dict[str, Any]:
    """The step metrics both paths start with."""
    return {"scheme": scheme, "ignore": ignore, "activations": ACTIVATIONS[scheme]}


def run_in_memory(model: LoadedModel, params: Any, ctx: MethodContext | None, method: str, calibrate: bool) -> Metrics:
    """Quantize ``model.module`` with the preset ``params.scheme`` through llm-compressor and set
    the compressed-tensors saver; the step's metrics (as the streaming form gives them)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from worker import llmc
    from worker.stream.fp import format_name, llmc_ignore, runs_notes

    if model.module is None:
        raise ValueError(f"{method} needs a transformers model directory (config.json), not a bare state dict")
    if getattr(model.module.config, "quantization_config", None) is not None:
        raise ValueError(f"{method}: the model is already quantized")
    _refuse_conv1d(model.module, method)
    # The LM head stays in float whatever ``ignore`` says, as on the streaming path; ``ignore`` is
    # read as at submit (a name or a dotted suffix of one, or re:<regex>).
    ignore = llmc_ignore(model.module, params.ignore)
    _refuse_widths(model.module, method, params.scheme, ignore)
    modifier = QuantizationModifier(scheme=params.scheme, targets="Linear", ignore=ignore)
    run = llmc.run_oneshot(model, ctx, [modifier], params) if calibrate else _data_free(model, modifier)  # type: ignore[arg-type]
    metrics, scheme = _measure(model.module)
    llmc.set_quantized_saver(model, method)
    fmt = format_name(scheme)
    model.notes.update({**runs_notes(params.scheme, fmt), "ignored_layers": metrics["ignored_layers"]})
    return {**scheme_metrics(params.scheme, params.ignore), "format": fmt, **metrics, **run}


def _data_free(model: LoadedModel, modifier: Any) -> Metrics:
    """``oneshot`` without a dataset: llm-compressor's data-free pipeline observes the weights."""
    from llmcompressor import oneshot

    from worker.llmc import exact_offset_norms

    with exact_offset_norms() as norms:
        oneshot(model=model.module, recipe=[modifier], output_dir=None, log_dir=None)
    model.module.eval()
    return dict(norms)


def _refuse_conv1d(module: Any, method: str) -> None:
    from transformers.pytorch_utils import Conv1D

    from core.methods._ct import CONV1D_REFUSAL

    if any(isinstance(m, Conv1D) for m in module.modules()):
        raise ValueError(CONV1D_REFUSAL.format(method=method, what=type(module).__name__))


def _refuse_widths(module: Any, method: str, scheme: str, ignore: list[str]) -> None:
    """The scheme's groups must divide every quantized layer's input width, and NVFP4 quantizes a
    fused group all or none (as at submit)."""
    import torch
    from compressed_tensors.utils import match_named_modules

    from core.methods.quantize_fp4 import split_fused_refusal
    from core.methods.quantize_fp8 import scheme_width_refusal

    widths = {n: m.weight.shape[1] for n, m in match_named_modules(module, ["Linear"], ignore)}
    every = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    refusal = scheme_width_refusal(method, scheme, widths) or split_fused_refusal(method, scheme, widths, every)
    if refusal is not None:
        raise refusal


def _measure(module: Any) -> tuple[dict[str, Any], Any]:
    """Error of the dequantized weights against the float ones, per layer and in all, read from
    the frozen modules before the saver compresses them; and the scheme attached."""
    import torch

    from worker.ops import fp
    from worker.ops.quant import ErrorStats

    stats = ErrorStats()
    per_layer: dict[str, float] = {}
    ignored: list[str] = []
    scheme = None
    with torch.no_grad():
        for name, m in module.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            s = getattr(m, "quantization_scheme", None)
            if s is None:
                ignored.append(name)
                continue
            scheme = s
            per_layer[name] = round(stats.add(m.weight, fp.dequantized(m)), 6)
    if scheme is None:
        raise ValueError("llm-compressor quantized no layer of this model")
    return {
        "layers_quantized": len(per_layer),
        "quantized_parameters": stats.elements,
        "ignored_layers": sorted(ignored),
        "relative_rms_error": round(stats.relative_rms_error, 8),
        "max_abs_error": stats.max_abs_err,
        "per_layer_relative_error": per_layer,
        "runs": "decompressed",
    }, scheme


def _stream(params: QuantizeFP8Params, ctx: Any) -> Any:
    from worker.stream import NotStreamable
    from worker.stream.fp import FloatQuantStep

    if params.scheme not in DATA_FREE:
        raise NotStreamable(f"quantize.fp8 scheme {params.scheme} calibrates on data: the model is built in memory")
    return FloatQuantStep(
        "quantize.fp8", params.scheme, params.ignore, lambda: scheme_metrics(params.scheme, params.ignore)
    )


@handler("quantize.fp8", stream=_stream)
def quantize_fp8(model: LoadedModel, params: QuantizeFP8Params, ctx: MethodContext) -> Metrics:
    """FP8 (e4m3) weights, per channel or 128x128 blocks, dynamic or calibrated activations (vLLM)."""
    return run_in_memory(model, params, ctx, "quantize.fp8", calibrate=params.scheme not in DATA_FREE)
