"""quantize.fp8 / quantize.fp4's streaming form: the data-free floating-point schemes (FP8_DYNAMIC,
FP8_BLOCK, NVFP4A16, MXFP4A16, MXFP4) written tensor by tensor from the input shards, the way
llm-compressor's model-free PTQ writes them, without building the model.

Each targeted Linear weight is quantized whole (one tensor in memory at a time, not one row
chunk: the 128x128 blocks of FP8_BLOCK and NVFP4's per-tensor global scale span rows; the
observers are llm-compressor's, worker/ops/fp.py). NVFP4's global scale is shared by the layers
vLLM fuses (q/k/v, gate/up), so a pre-pass reads those layers once for their largest magnitude.

The output is what the in-memory path (``oneshot`` + ``save_pretrained(save_compressed=True)``)
writes: the same tensors bit for bit and the same ``quantization_config``
(tests/test_fp_quant.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from worker.ops import fp
from worker.ops.quant import ErrorStats
from worker.stream import NotStreamable, Source, StreamStep, Target, TensorSpec

# The first output of a quantized weight (the row-streamed one); the others come from ``end``.
_LEAD = ("weight", "weight_packed")


def resolved_scheme(scheme: str, ignore: list[str]) -> Any:
    """The compressed-tensors scheme llm-compressor's QuantizationModifier attaches for a preset
    (observers filled in), so both paths write the same ``quantization_config``."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    mod = QuantizationModifier(scheme=scheme, targets="Linear", ignore=ignore)
    return mod.resolved_config.config_groups["group_0"]


class FloatQuantStep(StreamStep):
    """One data-free FP8/FP4 scheme applied to every Linear weight the in-memory path quantizes."""

    final = True

    def __init__(self, method: str, scheme_name: str, ignore: list[str], extra: Callable[[], dict[str, Any]]) -> None:
        self.method = method
        self.scheme_name = scheme_name
        self.ignore = ignore
        self.extra = extra
        self.scheme = resolved_scheme(scheme_name, ignore)
        self.skeleton: Any = None
        self.wanted: set[str] = set()
        self.names: list[str] = []
        self.group_max: dict[str, torch.Tensor] = {}
        self.groups: dict[str, str] = {}
        self.stats = ErrorStats()
        self.per_layer: dict[str, float] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._out_cache: dict[
            tuple[str, tuple[int, ...], torch.dtype], list[tuple[str, torch.dtype, tuple[int, ...]]]
        ] = {}
        self.float_bytes = 0
        self.stored_bytes = 0
        self.extra_bytes = 0
        self.notes: dict[str, Any] = {}

    def bind(self, skeleton: Any, targets: dict[str, Target]) -> None:
        from compressed_tensors.utils import match_named_modules

        if skeleton is None:
            raise NotStreamable(f"{self.method} needs a transformers model directory (config.json)")
        self.skeleton = skeleton
        # The in-memory path's choice: llm-compressor's matching of "Linear" less ``ignore`` and the
        # LM head (worker/methods/quantize_fp8.py), among the engine's targets.
        ignore = llmc_ignore(skeleton, self.ignore)
        matched = {n for n, _ in match_named_modules(skeleton, ["Linear"], ignore)}
        self.wanted = {t.removesuffix(".weight") for t, tg in targets.items() if tg.module_type == "Linear"} & matched

    def select(self, spec: TensorSpec, target: Target | None) -> bool:
        return target is not None and spec.name.removesuffix(".weight") in self.wanted

    def prepare(self, source: Source) -> None:
        from core.methods._ct import CONV1D_REFUSAL
        from core.methods.quantize_fp4 import split_fused_refusal
        from core.methods.quantize_fp8 import scheme_width_refusal

        if getattr(self.skeleton.config, "quantization_config", None) is not None:
            raise ValueError(f"{self.method}: the model is already quantized")
        if any(m.__class__.__name__ == "Conv1D" for m in self.skeleton.modules()):
            raise ValueError(CONV1D_REFUSAL.format(method=self.method, what=type(self.skeleton).__name__))
        if not len(source):
            raise ValueError(f"{self.method}: the model has no Linear layers to quantize")
        widths = {}
        for i in range(len(source)):
            spec = source.spec(i)
            if not spec.dtype.is_floating_point:
                raise ValueError(f"{self.method}: {spec.name} is {spec.dtype}, not floating point")
            name = spec.name.removesuffix(".weight")
            self.names.append(name)
            widths[name] = spec.shape[1]
        refusal = scheme_width_refusal(self.method, self.scheme_name, widths)
        if refusal is not None:
            raise refusal
        every = [n for n, m in self.skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
        refusal = split_fused_refusal(self.method, self.scheme_name, self.names, every)
        if refusal is not None:
            raise refusal
        if fp.uses_global_scale(self.scheme):
            # NVFP4: one global scale per fused group, from the group's largest magnitude.
            self.groups = fp.fused_groups(self.names)
            for i, w in enumerate(source):
                key = self.groups[self.names[i]]
                m = fp.absmax(w)
                self.group_max[key] = m if key not in self.group_max else torch.maximum(self.group_max[key], m)

    def whole_tensor(self, spec: TensorSpec, target: Target | None) -> bool:
        return True

    def _shapes(self, spec: TensorSpec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The tensors compressed-tensors stores for a weight of this shape: found by compressing
        one on the meta device (as llm-compressor's model-free PTQ plans its memory)."""
        key = (spec.name.rsplit(".", 2)[-2], spec.shape, spec.dtype)
        if key not in self._out_cache:
            w = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            out, _ = _quantize_meta(w, self.scheme)
            self._out_cache[key] = [(k, v.dtype, tuple(v.shape)) for k, v in out.items()]
        return self._out_cache[key]

    def out_specs(self, spec: TensorSpec, target: Target | None) -> list[TensorSpec]:
        base = spec.name.removesuffix(".weight")
        shapes = self._shapes(spec)
        lead = [s for s in shapes if s[0] in _LEAD]
        rest = [s for s in shapes if s[0] not in _LEAD]
        return [TensorSpec(f"{base}.{k}", dt, sh) for k, dt, sh in [*lead, *rest]]

    def start(self, spec: TensorSpec, target: Target | None, whole: Callable[[], torch.Tensor]) -> None:
        self._pending = {}
        self.float_bytes += spec.nbytes

    def rows(
        self, spec: TensorSpec, target: Target | None, x: torch.Tensor, r0: int, record: bool = True
    ) -> torch.Tensor:
        name = spec.name.removesuffix(".weight")
        gmax = self.group_max.get(self.groups.get(name, name)) if self.group_max else None
        out, stats = fp.quantize_weight(x, self.scheme, gmax)
        if record:
            self.per_layer[name] = round(stats.relative_rms_error, 6)
            self.stats.elements += stats.elements
            self.stats.sq_err += stats.sq_err
            self.stats.sq_w += stats.sq_w
            self.stats.max_abs_err = max(self.stats.max_abs_err, stats.max_abs_err)
        lead = next(k for k in _LEAD if k in out)
        self._pending = {f"{name}.{k}": v.contiguous() for k, v in out.items() if k != lead}
        self.stored_bytes += sum(v.numel() * v.element_size() for v in out.values())
        # As transformers holds them once it has decompressed the weights: the scales (fp8, e8m0
        # or the weight's dtype as stored) in the weight's dtype, NVFP4's global scale in float32.
        self.extra_bytes += sum(
            v.numel() * (spec.dtype.itemsize if k == "weight_scale" else v.element_size())
            for k, v in out.items()
            if k != lead
        )
        return out[lead].contiguous()

    def end(self, spec: TensorSpec, target: Target | None) -> dict[str, torch.Tensor]:
        out, self._pending = self._pending, {}
        return out

    def _ignored(self) -> list[str]:
        wanted = set(self.names)
        return sorted(n for n, m in self.skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n not in wanted)

    def update_config(self, config: dict[str, Any]) -> None:
        """quantization_config as the in-memory path's save writes it: the scheme attached to the
        meta skeleton's quantized layers, read back by compressed-tensors' ModelCompressor."""
        from worker.ct_format import skeleton_quantization_config

        config["quantization_config"] = skeleton_quantization_config(
            self.skeleton, {"group_0": self.scheme}, self._ignored(), self.names
        )

    def metrics(self) -> dict[str, Any]:
        ignore = self._ignored()
        fmt = format_name(self.scheme)
        self.notes.update(
            {
                **runs_notes(self.scheme_name, fmt),
                "ignored_layers": ignore,
                "memory_bytes_extra": self.extra_bytes,
                "memory_bytes_compressed_delta": self.stored_bytes - self.extra_bytes - self.float_bytes,
            }
        )
        return {
            **self.extra(),
            "format": fmt,
            "layers_quantized": len(self.names),
            "quantized_parameters": self.stats.elements,
            "ignored_layers": ignore,
            "relative_rms_error": round(self.stats.relative_rms_error, 8),
            "max_abs_error": self.stats.max_abs_err,
            "per_layer_relative_error": self.per_layer,
            "runs": "decompressed",
        }


def llmc_ignore(module: Any, ignore: list[str]) -> list[str]:
    """``ignore`` as llm-compressor matches it, read as the submit-time check reads it
    (core/methods/_ct.py ``ignored``: a module's name, a dotted suffix of it, or ``re:<regex>``;
    llm-compressor alone would match whole names only), plus the LM head, which stays in float."""
    import re

    from worker.llmc import prune_ignore

    # llm-compressor 0.14 may match a layer under its name with a trailing dot (worker/llmc.py).
    pats = [p if p.startswith("re:") else f"re:(?:^|.*\\.){re.escape(p)}\\.?$" for p in ignore]
    return prune_ignore(_Loaded(module), pats)


class _Loaded:
    """What worker.llmc.prune_ignore reads of a LoadedModel: its module."""

    def __init__(self, module: Any) -> None:
        self.module = module


def _quantize_meta(w: torch.Tensor, scheme: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The stored tensors' names, dtypes and shapes for a weight like ``w`` (meta tensors)."""
    from compressed_tensors.compressors import compress_module
    from llmcompressor.entrypoints.model_free.lifecycle import initialize_quantized_linear

    module = initialize_quantized_linear(w, scheme, "meta")
    compress_module(module)
    return dict(module.state_dict()), None


def format_name(scheme: Any) -> str:
    """The compressed-tensors format a scheme is stored in (``float-quantized``, ``nvfp4-pack-quantized``...)."""
    from compressed_tensors.compressors.format import infer_module_format

    return str(infer_module_format(torch.nn.Linear, scheme).value)


def runs_notes(scheme_name: str, fmt: str) -> dict[str, Any]:
    """How the artifact runs, for the report: decompressed on a CPU, natively where vLLM has kernels."""
    from core.methods._ct import RUNS_DECOMPRESSED

    return {
        "format": f"compressed-tensors {fmt}",
        "runs": RUNS_DECOMPRESSED,
        "runs_detail": (
            f"transformers + compressed-tensors on CPU dequantize the {scheme_name} weights to their float dtype "
            "on the first forward pass and no FP8/FP4 kernel runs"
            + ("" if scheme_name.endswith("A16") else " (activations are quantized and dequantized in float)")
            + ": the report's quality is that of the dequantized weights, its speed not that of FP8/FP4 "
            "hardware. vLLM runs the checkpoint with its FP8/FP4 kernels on GPUs that have them"
        ),
    }
