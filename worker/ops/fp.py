"""Floating-point weight formats (FP8, NVFP4, MXFP4): the quantization of one Linear weight as
llm-compressor and compressed-tensors compute it, for quantize.fp8 / quantize.fp4.

No math of our own: a weight is quantized exactly as llm-compressor 0.14's model-free PTQ
(``llmcompressor.entrypoints.model_free``) does it, which is also what its ``oneshot`` does to a
model's Linear layers: a bare ``nn.Linear`` holding the weight gets the scheme attached
(``initialize_quantized_linear``), its weight observer computes the scales
(``calibrate_weight``), and compressed-tensors' ``compress_module`` writes the stored tensors
(``weight`` float8_e4m3fn + ``weight_scale``; ``weight_packed`` uint8 FP4 pairs + ``weight_scale``
(+ ``weight_global_scale``) for FP4). The streaming engine (worker/stream/fp.py) calls this one
tensor at a time; tests/test_fp_quant.py compares its output with the in-memory path bit for bit.

NVFP4's per-tensor ``weight_global_scale`` is shared by layers that vLLM fuses into one matmul
(q/k/v, gate/up): llm-compressor links their observers (``fuse_weight_observers``) and takes the
largest magnitude of the group. :func:`fused_groups` names those groups from tensor names and
:func:`quantize_weight` takes the group's magnitude (``absmax``) from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from worker.ops.quant import ErrorStats


def fused_groups(names: Iterable[str]) -> dict[str, str]:
    """Module name -> the name of its fused group (the module itself when it has none):
    core/methods/quantize_fp4.py's, which the submit-time check uses."""
    from core.methods.quantize_fp4 import fused_groups as groups

    return groups(names)


def uses_global_scale(scheme: Any) -> bool:
    """Whether the weights carry a per-tensor global scale (NVFP4's TENSOR_GROUP strategy)."""
    from compressed_tensors.quantization import QuantizationStrategy

    return scheme.weights is not None and scheme.weights.strategy == QuantizationStrategy.TENSOR_GROUP


def absmax(w: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of a weight, in its dtype (what the observers compare)."""
    return w.abs().amax()


def quantize_weight(
    weight: torch.Tensor, scheme: Any, group_absmax: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], ErrorStats]:
    """Quantize one 2-D Linear weight with ``scheme`` (a resolved compressed-tensors
    ``QuantizationScheme``): (the tensors compressed-tensors stores for it, by suffix:
    ``weight``/``weight_packed``, ``weight_scale``...; its error stats, measured on the
    dequantized weight the stored values give). ``group_absmax``: the fused group's largest
    magnitude, for a scheme with a global scale."""
    from compressed_tensors.compressors import compress_module, decompress_module
    from compressed_tensors.quantization.utils.helpers import generate_gparam
    from llmcompressor.entrypoints.model_free.lifecycle import initialize_quantized_linear
    from llmcompressor.modifiers.quantization.calibration import (
        apply_calibration_status,
        freeze_module_quantization,
        initialize_observer,
        observe,
        update_qparams,
    )

    with torch.no_grad():
        module = initialize_quantized_linear(weight, scheme, weight.device)
        initialize_observer(module, "weight")
        apply_calibration_status(module)
        if group_absmax is not None and uses_global_scale(scheme):
            m = group_absmax.to(weight.dtype).reshape(1)
            # What the observer computes from the fused group's statistics (Observer.get_global_scale).
            module.weight_observer.get_global_scale = lambda: generate_gparam(-m, m)
        observe(module, base_name="weight")
        update_qparams(module, base_name="weight")
        freeze_module_quantization(module)
        compress_module(module)
        out = dict(module.state_dict())
        # The error of what is stored, read back by compressed-tensors' decompression (cheaper than
        # a second quantize-dequantize: no rounding; the stored tensors stay in ``out``).
        decompress_module(module)
        stats = ErrorStats()
        stats.add(weight, module.weight)
    return out, stats


def dequantized(module: Any) -> torch.Tensor:
    """A quantized (frozen, not yet compressed) Linear's weight as the stored values give it back."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = module.quantization_scheme.weights
    return fake_quantize(
        module.weight,
        module.weight_scale,
        getattr(module, "weight_zero_point", None),
        args,
        global_scale=getattr(module, "weight_global_scale", None),
    )
