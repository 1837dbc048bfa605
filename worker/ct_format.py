"""Quantized artifacts in the compressed-tensors format, written with that library's own API.

The quantize.* methods share this: each picks a compressed-tensors ``QuantizationScheme`` and a
function that computes round-to-nearest scales (worker/ops/quant.py); this module then

1. attaches the scheme to every target ``nn.Linear`` with ``apply_quantization_config``
   (``targets=["Linear"]``; every other Linear, i.e. the LM head, goes to ``ignore``; embeddings
   are ``nn.Embedding`` and are not targeted at all);
2. writes our scales/zero points into the ``weight_scale`` / ``weight_zero_point`` parameters the
   library created, and measures the quantization error with the stored (dtype-cast) values;
3. sets ``LoadedModel.saver``: at save time ``ModelCompressor.from_pretrained_model`` rebuilds
   the config from the attached schemes, ``compress_model`` turns weights into integers (int8
   ``weight`` for W8A8, ``weight_packed`` int32 for weight-only: the format compressed-tensors
   infers, the one llm-compressor writes for these schemes), ``save_pretrained`` writes the
   safetensors, ``update_config`` adds ``quantization_config`` (quant_method
   ``compressed-tensors``) to config.json. The model is decompressed again afterwards so the
   pipeline's post-save metrics can still read ``.weight``.

No calibration data is needed: weights are quantized round-to-nearest, activations (W8A8) are
quantized dynamically at run time, so llm-compressor's ``oneshot`` would add a dependency and a
calibration loop for nothing.

GPT-2 and the other models built from transformers' ``Conv1D`` are refused: compressed-tensors
(and transformers' loader, which calls it) quantizes only ``nn.Linear``/``nn.Embedding``, so a
GPT-2 checkpoint with packed Conv1D weights could not be loaded by ``from_pretrained``.

Module-level imports are stdlib only: the API imports the checks through the method registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# transformers model types whose projections are Conv1D (transformers/models/*: `= Conv1D(`).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})

CONV1D_REFUSAL = (
    "{method} writes a compressed-tensors checkpoint, which quantizes torch.nn.Linear layers only; "
    "{what} keeps its attention and MLP weights in transformers' Conv1D layers, so transformers could "
    "not load the packed weights. Use quantize.cast or prune.magnitude for this model."
)

# How the artifact runs, recorded in the report (measured: transformers 5.17 + compressed-tensors
# 0.19 on CPU decompress on the first forward; no integer matmul runs).
RUNS_DECOMPRESSED = "decompressed"


def _config_dims(config: dict[str, Any]) -> dict[str, int]:
    """Input widths of the model's Linear layers that the config names (best effort: the handler
    checks every layer again)."""
    dims: dict[str, int] = {}
    for cfg in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else None):
        if not cfg:
            continue
        for key in ("hidden_size", "intermediate_size"):
            v = cfg.get(key)
            if isinstance(v, int) and v > 0:
                dims[key] = v
        heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
        if isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0:
            dims["num_attention_heads * head_dim"] = heads * head_dim
    return dims


def check_model(method: str, info: Any, group_size: int | None = None) -> None:
    """Submit-time refusal (ValueError -> 422) of models whose artifact could not be written or
    loaded. ``info`` is worker.methods.ModelInfo; only the config dict is read."""
    config = info.config or {}
    if "quantization_config" in config:
        qm = (config.get("quantization_config") or {}).get("quant_method", "?")
        raise ValueError(f"{method}: the model is already quantized (quant_method {qm!r}); upload the unquantized model")
    model_type = config.get("model_type")
    if model_type in CONV1D_MODEL_TYPES:
        what = f"{info.architecture or 'this model'} (model_type {model_type!r})"
        raise ValueError(CONV1D_REFUSAL.format(method=method, what=what))
    if group_size:
        for key, v in _config_dims(config).items():
            if v % group_size:
                raise ValueError(
                    f"{method}: group_size {group_size} does not divide the model's {key} ({v}); "
                    "compressed-tensors groups consecutive input columns, so every Linear input width "
                    "must be a multiple of it: use a smaller group_size or null (per channel)"
                )


def quantize_linear_layers(
    loaded: Any,
    *,
    method: str,
    weights: dict[str, Any],
    input_activations: dict[str, Any] | None,
    qparams: Callable[[Any], tuple[Any, Any]],
    ctx: Any = None,
) -> dict[str, Any]:
    """Attach the scheme, store RTN scales from ``qparams(weight) -> (scale fp32, zero_point
    int8)``, set the compressed-tensors saver. Returns the step's metrics."""
    import torch
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from transformers.pytorch_utils import Conv1D

    from worker.ops import quant

    module = loaded.module
    if module is None:
        raise ValueError(f"{method} needs a transformers model directory (config.json), not a bare state dict")
    qc = getattr(module.config, "quantization_config", None)
    if qc is not None:
        raise ValueError(f"{method}: the model is already quantized")
    mods = dict(module.named_modules())
    targets = loaded.targets()
    convs = [t.name for t in targets if isinstance(mods[t.name.removesuffix(".weight")], Conv1D)]
    if convs:
        raise ValueError(CONV1D_REFUSAL.format(method=method, what=f"{type(module).__name__} ({convs[0]}, ...)"))
    if not targets:
        raise ValueError(f"{method}: the model has no Linear layers to quantize")

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**weights),
        input_activations=QuantizationArgs(**input_activations) if input_activations else None,
    )
    args = scheme.weights
    group = args.group_size if args.strategy == "group" else None
    names = [t.name.removesuffix(".weight") for t in targets]
    for name in names:
        w = mods[name].weight
        if not w.is_floating_point():
            raise ValueError(f"{method}: {name}.weight is {w.dtype}, not floating point")
        if group and w.shape[1] % group:
            raise ValueError(f"{method}: {name} has {w.shape[1]} input features, not a multiple of group_size {group}")

    # The LM head (and any other Linear the targets leave out) is named in `ignore`: it stays in
    # the model's float dtype and the loader skips it.
    wanted = set(names)
    ignore = sorted(n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and n not in wanted)
    apply_quantization_config(module, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore), show_progress=False)
    attached = {n for n, m in module.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if attached != wanted:
        raise RuntimeError(f"compressed-tensors matched {sorted(attached ^ wanted)[:5]} differently from the targets")

    stats = quant.ErrorStats()
    scratch = quant.Scratch()
    per_layer: dict[str, float] = {}
    every = max(1, len(names) // 10)
    with torch.no_grad():
        for i, name in enumerate(names):
            m = mods[name]
            w = m.weight.data
            scale, zp = qparams(w)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))  # cast to the stored dtype
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
            # Measure with what is stored, exactly as the compressor will quantize.
            stored_zp = None if args.symmetric else m.weight_zero_point.data
            err = quant.quantize_error(w, m.weight_scale.data, stored_zp, args.num_bits, group, scratch)
            per_layer[name] = round(stats.add_diff(w, err), 6)
            m.quantization_status = QuantizationStatus.FROZEN
            if ctx is not None and (i + 1) % every == 0:
                ctx.step_progress(f"{i + 1}/{len(names)} layers", (i + 1) / len(names))

    fmt = infer_module_format(torch.nn.Linear, scheme).value
    dtype = str(mods[names[0]].weight.dtype).removeprefix("torch.")
    running, stored = _memory(module, [mods[n] for n in names], args, fmt)
    loaded.saver = save_compressed
    loaded.notes.update({
        "format": f"compressed-tensors {fmt}",
        "runs": RUNS_DECOMPRESSED,
        # In memory once transformers has decompressed it (the first forward), and before that
        # (or in an engine that keeps the integers): parameters and buffers, tied ones once.
        "memory_bytes": running,
        "memory_bytes_compressed": stored,
        "runs_detail": (
            f"transformers + compressed-tensors on CPU dequantize the integer weights to {dtype} on the "
            "first forward pass; no integer matmul kernel runs"
            + ("; int8 activations are simulated per token (quantize-dequantize in floating point)" if input_activations else "")
        ),
        "ignored_layers": ignore,
    })
    return {
        "bits": args.num_bits,
        "group_size": group,
        "strategy": args.strategy,
        "symmetric": args.symmetric,
        "activations": (
            f"int{scheme.input_activations.num_bits} dynamic per-{scheme.input_activations.strategy}"
            if scheme.input_activations else None
        ),
        "format": fmt,
        "layers_quantized": len(names),
        "quantized_parameters": stats.elements,
        "ignored_layers": ignore,
        "relative_rms_error": round(stats.relative_rms_error, 8),
        "max_abs_error": stats.max_abs_err,
        "per_layer_relative_error": per_layer,
        "runs": RUNS_DECOMPRESSED,
    }


def _memory(module: Any, quantized: list[Any], args: Any, fmt: str) -> tuple[int, int]:
    """Bytes of the reloaded model's parameters and buffers: decompressed (float weights, scales,
    asymmetric zero points, pack-quantized's ``weight_shape``) and compressed (integer weights as
    stored, zero points packed into int32 along the output dim)."""
    import math

    seen: set[int] = set()
    running = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            running += t.numel() * t.element_size()
    stored = running
    for m in quantized:
        out_f, in_f = m.weight.shape
        zp = getattr(m, "weight_zero_point", None)
        if zp is not None:
            # apply_quantization_config creates zero points for symmetric schemes too; the
            # compressor drops them, so the reloaded model has none.
            running -= zp.numel() * zp.element_size()
            stored -= zp.numel() * zp.element_size()
            if not args.symmetric:
                running += zp.numel()  # int8 once unpacked
                stored += (zp.numel() if fmt != "pack-quantized" else math.ceil(zp.shape[0] * args.num_bits / 32) * zp.shape[1] * 4)
        stored -= m.weight.numel() * m.weight.element_size()
        if fmt == "pack-quantized":
            stored += out_f * math.ceil(in_f * args.num_bits / 32) * 4 + 16  # int32 words + weight_shape
            running += 16  # weight_shape stays after decompression
        else:
            stored += out_f * in_f  # int8
    return running, stored


def save_compressed(loaded: Any, out_dir: Path, max_shard_size: int) -> None:
    """The LoadedModel saver: compress in place, save, add quantization_config, decompress."""
    from compressed_tensors.compressors import ModelCompressor

    model = loaded.module
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    try:
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
        compressor.update_config(str(out_dir))
    finally:
        # Back to float weights (the quantized values) so code after the save can read .weight.
        compressor.decompress_model(model)
