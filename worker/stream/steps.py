"""The data-free methods' streaming forms: the same tensor math as their in-memory handlers
(worker/ops), applied to row chunks of one tensor at a time. Method files build these from their
parameters (``worker.methods.Method.stream``); the equivalence with the in-memory path is tested bit for bit
(tests/test_stream.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from worker.model_io import _selected
from worker.ops import parallel, quant
from worker.ops import sparsity as sp
from worker.stream import Source, StreamStep, Target, TensorSpec

# Rows handed to one thread at a time by QuantizeStep: ~0.5 M weights, so that the kernel's
# temporaries (about 13 bytes a weight) stay in a core's cache.
BLOCK_ELEMENTS = 1 << 19


def _scratch() -> quant.Scratch:
    """This thread's buffers for ``quant.quantize_rows``."""
    st = parallel.state()
    s = getattr(st, "quant_scratch", None)
    if s is None:
        s = st.quant_scratch = quant.Scratch()
    return s


class CastStep(StreamStep):
    """Every floating-point tensor to ``dtype`` (what ``module.to(dtype)`` does to parameters)."""

    def __init__(self, dtype_name: str) -> None:
        self.dtype_name = dtype_name
        self.dtype = getattr(torch, dtype_name)
        self.before: set[str] = set()
        self.cast: dict[str, int] = {}

    def select(self, spec: TensorSpec, target: Target | None) -> bool:
        return spec.dtype.is_floating_point

    def out_dtype(self, spec: TensorSpec) -> torch.dtype:
        return self.dtype if spec.dtype.is_floating_point else spec.dtype

    def start(self, spec: TensorSpec, target: Target | None, whole: Callable[[], torch.Tensor]) -> None:
        self.before.add(str(spec.dtype).removeprefix("torch."))
        self.cast[spec.name] = spec.numel

    def rows(
        self, spec: TensorSpec, target: Target | None, x: torch.Tensor, r0: int, record: bool = True
    ) -> torch.Tensor:
        return x.to(self.dtype, copy=True)

    def update_config(self, config: dict[str, Any]) -> None:
        # transformers 5 writes "dtype"; older configs say "torch_dtype": keep whichever is there.
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = self.dtype_name

    def metrics(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype_name,
            "from_dtypes": sorted(self.before),
            "cast_parameters": sum(self.cast.values()),
        }


class PruneStep(StreamStep):
    """prune.magnitude: threshold, global (exact k-th magnitude found in a pre-pass), per layer,
    per row."""

    def __init__(
        self,
        sparsity: float | None,
        threshold: float | None,
        scope: str,
        include: list[str] | None,
        exclude: list[str] | None,
    ) -> None:
        self.sparsity, self.threshold, self.scope = sparsity, threshold, scope
        self.include, self.exclude = include, exclude
        self.global_k = 0
        self.global_theta: float | None = None
        self.layer_theta: float | None = None
        self.zeros: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.needs_prepass = threshold is None and scope == "global"

    def select(self, spec: TensorSpec, target: Target | None) -> bool:
        return target is not None and _selected(target.name.removesuffix(".weight"), self.include, self.exclude)

    def prepare(self, source: Source) -> None:
        if not len(source):
            raise ValueError("no target weights matched (check 'targets' and 'exclude')")
        if self.threshold is None and self.scope == "global":
            total = sum(source.spec(i).numel for i in range(len(source)))
            self.global_k = round(self.sparsity * total)  # type: ignore[operator]
            if self.global_k:
                self.global_theta = sp.kth_smallest_abs(source, self.global_k)

    def whole_tensor(self, spec: TensorSpec, target: Target | None) -> bool:
        # Per-row pruning of a Conv1D weight ([in, out]) works on columns.
        return self.scope == "row" and self.threshold is None and target is not None and target.row_dim != 0

    def start(self, spec: TensorSpec, target: Target | None, whole: Callable[[], torch.Tensor]) -> None:
        self.layer_theta = None
        self.zeros[spec.name] = 0
        self.sizes[spec.name] = spec.numel
        if self.threshold is None and self.scope == "layer":
            k = round(self.sparsity * spec.numel)  # type: ignore[operator]
            if k:
                self.layer_theta = sp.kth_smallest_abs([whole()], k)

    def rows(
        self, spec: TensorSpec, target: Target | None, x: torch.Tensor, r0: int, record: bool = True
    ) -> torch.Tensor:
        self.output_nonzero = None
        if self.threshold is not None:
            y, z = sp.prune_copy(x, self.threshold, inclusive=False)
            if self.threshold > 0:  # every zero is under the threshold: the mask counted them all
                self.output_nonzero = y.numel() - z
        elif self.scope == "row":
            y = x.clone(memory_format=torch.contiguous_format)
            z = sp.prune_per_row([y], self.sparsity, [target.row_dim if target else 0])[0]  # type: ignore[arg-type]
        else:
            theta = self.global_theta if self.scope == "global" else self.layer_theta
            if theta is not None:
                y, z = sp.prune_copy(x, theta, inclusive=True)
                self.output_nonzero = y.numel() - z  # |w| <= theta holds every zero
            else:
                y = x.clone(memory_format=torch.contiguous_format)
                z = int((y == 0).sum())
        if record:
            self.zeros[spec.name] = self.zeros.get(spec.name, 0) + z
        return y

    def metrics(self) -> dict[str, Any]:
        total = sum(self.sizes.values())
        zeros = sum(self.zeros.values())
        return {
            "target_parameters": total,
            "target_zeros": zeros,
            "achieved_sparsity": zeros / total if total else 0.0,
            "requested_sparsity": self.sparsity,
            "threshold": self.threshold,
            "layers": len(self.sizes),
            "per_layer_sparsity": {n: round(self.zeros[n] / s, 6) for n, s in self.sizes.items()},
        }


class QuantizeStep(StreamStep):
    """Round-to-nearest integer weights written in compressed-tensors' format: the integers its
    ``quantize`` makes and the words its ``pack_to_int32`` writes, computed by ``quant.quantize_rows``
    and ``quant.pack_int32`` one cache-sized row block per core (tests/test_quant_ops.py and
    tests/test_stream.py check them bit for bit against the library). ``qparams`` is called on
    row blocks from several threads at once."""

    final = True
    # rows() counts the non-zeros of its input (in ``input_nonzero``) on the copy it makes anyway.
    counts_input = True

    def __init__(
        self,
        method: str,
        weights: dict[str, Any],
        input_activations: dict[str, Any] | None,
        qparams: Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]],
        scheme_name: str,
        extra: Callable[[], dict[str, Any]] | None = None,
        strict_group: bool = False,
        max_abs_qparams: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        from compressed_tensors.compressors.format import infer_module_format

        from worker.ct_format import config_groups

        self.method = method
        self.scheme_name = scheme_name
        self.extra = extra
        self.weights, self.input_activations = weights, input_activations
        self.scheme = config_groups(weights, input_activations, {})["group_0"]
        self.args = self.scheme.weights
        self.group = self.args.group_size if self.args.strategy == "group" else None
        self.strict_group = strict_group
        # Every layer's group size (the requested one, or its fallback: core/methods/_ct.py).
        self.groups: dict[str, int | None] = {}
        self.fallbacks: dict[str, int | None] = {}
        self.fmt = infer_module_format(torch.nn.Linear, self.scheme).value
        self.packed = self.fmt == "pack-quantized"
        self.qparams = qparams
        # Where the scales depend on each group's largest magnitude only (symmetric round to
        # nearest): the same scales from the integer bit patterns the non-zero count reads anyway
        # (quant.group_max_abs), instead of qparams' float min and max over a float32 copy.
        self.max_abs_qparams = max_abs_qparams
        self.skeleton: Any = None
        self.stats = quant.ErrorStats()
        self.per_layer: dict[str, float] = {}
        self._layer = quant.ErrorStats()
        self._scales: list[torch.Tensor] = []
        self._zps: list[torch.Tensor] = []
        self.names: list[str] = []
        self.float_bytes = 0  # the quantized weights as floats (how they load)
        self.packed_bytes = 0  # ... and as stored
        self.extra_bytes = 0  # what loading attaches per layer: scales, weight_shape, int8 zero points
        self.zp_delta = 0  # stored (packed) minus loaded (int8) zero-point bytes
        self.notes: dict[str, Any] = {}

    def prepare(self, source: Source) -> None:
        from core.methods._ct import CONV1D_REFUSAL
        from worker.ct_format import layer_groups

        self.skeleton = source.skeleton
        if self.skeleton is None:
            raise ValueError(f"{self.method} needs a transformers model directory (config.json), not a bare state dict")
        if getattr(self.skeleton.config, "quantization_config", None) is not None:
            raise ValueError(f"{self.method}: the model is already quantized")
        if not len(source):
            raise ValueError(f"{self.method}: the model has no Linear layers to quantize")
        widths: dict[str, int] = {}
        for i in range(len(source)):
            spec, target = source.spec(i), source.target(i)
            name = spec.name.removesuffix(".weight")
            if target is not None and target.module_type == "Conv1D":
                raise ValueError(
                    CONV1D_REFUSAL.format(method=self.method, what=f"{type(self.skeleton).__name__} ({spec.name}, ...)")
                )
            if not spec.dtype.is_floating_point:
                raise ValueError(f"{self.method}: {name}.weight is {spec.dtype}, not floating point")
            self.names.append(name)
            widths[name] = spec.shape[1]
        self.groups, self.fallbacks = layer_groups(self.method, self.group, widths, self.strict_group)

    def _group_of(self, spec: TensorSpec) -> int | None:
        return self.groups.get(spec.name.removesuffix(".weight"), self.group)

    def _scale_cols(self, spec: TensorSpec) -> int:
        g = self._group_of(spec)
        return spec.shape[1] // g if g else 1

    def out_specs(self, spec: TensorSpec, target: Target | None) -> list[TensorSpec]:
        base = spec.name.removesuffix(".weight")
        rows, cols = spec.shape
        scale = TensorSpec(f"{base}.weight_scale", spec.dtype, (rows, self._scale_cols(spec)))
        if not self.packed:
            out = [TensorSpec(f"{base}.weight", torch.int8, spec.shape), scale]
            if not self.args.symmetric:
                out.append(TensorSpec(f"{base}.weight_zero_point", torch.int8, scale.shape))
            return out
        bits = self.args.num_bits
        out = [
            TensorSpec(f"{base}.weight_packed", torch.int32, (rows, math.ceil(cols * bits / 32))),
            scale,
            TensorSpec(f"{base}.weight_shape", torch.int64, (2,)),
        ]
        if not self.args.symmetric:
            out.append(
                TensorSpec(f"{base}.weight_zero_point", torch.int32, (math.ceil(rows * bits / 32), scale.shape[1]))
            )
        return out

    def start(self, spec: TensorSpec, target: Target | None, whole: Callable[[], torch.Tensor]) -> None:
        self._layer = quant.ErrorStats()
        self._scales, self._zps = [], []
        self.float_bytes += spec.nbytes

    def rows(
        self, spec: TensorSpec, target: Target | None, x: torch.Tensor, r0: int, record: bool = True
    ) -> torch.Tensor:
        n, width = x.shape
        cols = self._scale_cols(spec)
        group = self._group_of(spec)
        bits = self.args.num_bits
        out = (
            torch.empty(n, math.ceil(width * bits / 32), dtype=torch.int32)
            if self.packed
            else torch.empty(n, width, dtype=torch.int8)
        )
        scales = torch.empty(n, cols, dtype=spec.dtype)  # stored in the parameter's dtype
        zps = None if self.args.symmetric else torch.empty(n, cols, dtype=self.args.zp_dtype or torch.int8)

        def block(r: tuple[int, int]) -> tuple[int, int, float, float, float]:
            a, b = r
            xs = x[a:b]
            scratch = _scratch()
            # One float32 copy serves the scales and the error sums (the qparams functions give
            # the same result for the weights widened: min, max and power-of-two products are
            # exact).
            wf = scratch.get(3, xs, torch.float32)
            wf.copy_(xs)
            mag = quant.magnitude_bits(xs, scratch)
            nonzero = quant.count_nonzero(xs, scratch, magnitude=mag)
            if self.max_abs_qparams is not None and mag is not None:
                scale, zp = self.max_abs_qparams(quant.group_max_abs(mag, xs.dtype, group))
            else:
                scale, zp = self.qparams(wf, group)
            scales[a:b].copy_(scale.reshape(b - a, cols))
            if zps is not None:
                zps[a:b].copy_(zp.reshape(b - a, cols))
            # The integers exactly as compressed-tensors' quantize makes them from the stored
            # scale (tests/test_stream.py compares the artifacts bit for bit).
            q, se, sw, mx = quant.quantize_rows(
                xs, scales[a:b], None if zps is None else zps[a:b], bits, group, scratch, w_float=wf
            )
            if self.packed:
                quant.pack_int32(q, bits, out=out[a:b], scratch=scratch)
            else:
                out[a:b].copy_(q)
            return xs.numel(), nonzero, se, sw, mx

        step = max(1, BLOCK_ELEMENTS // max(1, width))
        self.input_nonzero = 0
        for count, nonzero, se, sw, mx in parallel.map_ordered(
            block, [(a, min(a + step, n)) for a in range(0, n, step)]
        ):
            self.input_nonzero += nonzero
            # Summed in row order whatever thread finished first: the metrics do not vary run to run.
            self._layer.elements += count
            self._layer.sq_err += se
            self._layer.sq_w += sw
            self._layer.max_abs_err = max(self._layer.max_abs_err, mx)
        self._scales.append(scales)
        if zps is not None:
            self._zps.append(zps)
        self.packed_bytes += out.numel() * out.element_size()
        return out

    def end(self, spec: TensorSpec, target: Target | None) -> dict[str, torch.Tensor]:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        base = spec.name.removesuffix(".weight")
        layer = self._layer
        self.per_layer[base] = round(layer.relative_rms_error, 6)
        self.stats.elements += layer.elements
        self.stats.sq_err += layer.sq_err
        self.stats.sq_w += layer.sq_w
        self.stats.max_abs_err = max(self.stats.max_abs_err, layer.max_abs_err)
        out = {f"{base}.weight_scale": torch.cat(self._scales)}
        self.extra_bytes += out[f"{base}.weight_scale"].numel() * spec.dtype.itemsize + (16 if self.packed else 0)
        if self.packed:
            out[f"{base}.weight_shape"] = torch.tensor(spec.shape)
            if not self.args.symmetric:
                zp = torch.cat(self._zps)
                out[f"{base}.weight_zero_point"] = pack_to_int32(zp, self.args.num_bits, packed_dim=0).contiguous()
                self.extra_bytes += zp.numel()
                self.zp_delta += out[f"{base}.weight_zero_point"].numel() * 4 - zp.numel()
        elif not self.args.symmetric:
            out[f"{base}.weight_zero_point"] = torch.cat(self._zps)
            self.extra_bytes += out[f"{base}.weight_zero_point"].numel()
        self._scales, self._zps = [], []
        return out

    def _ignored(self) -> list[str]:
        wanted = set(self.names)
        return sorted(n for n, m in self.skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n not in wanted)

    def update_config(self, config: dict[str, Any]) -> None:
        """quantization_config exactly as the compressor writes it for the in-memory path: the
        scheme attached to the meta skeleton, read back by ModelCompressor."""
        from worker.ct_format import config_groups, skeleton_quantization_config

        groups = config_groups(self.weights, self.input_activations, self.fallbacks)
        config["quantization_config"] = skeleton_quantization_config(self.skeleton, groups, self._ignored(), self.names)

    def metrics(self) -> dict[str, Any]:
        from core.methods._ct import RUNS_DECOMPRESSED, describe_fallbacks

        act = self.scheme.input_activations
        ignore = self._ignored()
        self.notes.update(
            {
                "format": f"compressed-tensors {self.fmt}",
                "runs": RUNS_DECOMPRESSED,
                "runs_detail": (
                    "transformers + compressed-tensors on CPU dequantize the integer weights to their float dtype "
                    "on the first forward pass; no integer matmul kernel runs"
                    + (
                        "; int8 activations are simulated per token (quantize-dequantize in floating point)"
                        if act
                        else ""
                    )
                ),
                "ignored_layers": ignore,
                "memory_bytes_extra": self.extra_bytes,
                "memory_bytes_compressed_delta": self.packed_bytes - self.float_bytes + self.zp_delta,
            }
        )
        return {
            "scheme": self.scheme_name,
            **(self.extra() if self.extra else {}),
            "bits": self.args.num_bits,
            "group_size": self.group,
            "strategy": self.args.strategy,
            "symmetric": self.args.symmetric,
            "activations": f"int{act.num_bits} dynamic per-{act.strategy}" if act else None,
            "format": self.fmt,
            "layers_quantized": len(self.names),
            "group_fallbacks": describe_fallbacks(self.fallbacks),
            "quantized_parameters": self.stats.elements,
            "ignored_layers": ignore,
            "relative_rms_error": round(self.stats.relative_rms_error, 8),
            "max_abs_error": self.stats.max_abs_err,
            "per_layer_relative_error": self.per_layer,
            "runs": RUNS_DECOMPRESSED,
        }
