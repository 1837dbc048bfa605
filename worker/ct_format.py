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

On the block path (weights in compressed-tensors' disk offload) the llm-compressor methods' results
are written by worker/ct_offload.py's ``save_offloaded``: the files llm-compressor's
``save_pretrained`` writes, one module at a time instead of the whole model gathered.

No calibration data is needed: weights are quantized round-to-nearest, activations (W8A8) are
quantized dynamically at run time, so llm-compressor's ``oneshot`` would add a dependency and a
calibration loop for nothing.

GPT-2 and the other models built from transformers' ``Conv1D`` are refused: compressed-tensors
(and transformers' loader, which calls it) quantizes only ``nn.Linear``/``nn.Embedding``, so a
GPT-2 checkpoint with packed Conv1D weights could not be loaded by ``from_pretrained``.

The submit-time checks (and the Conv1D refusal) are core/methods/_ct.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.methods._ct import CONV1D_REFUSAL, RUNS_DECOMPRESSED
from worker.context import MethodContext

# The block path's save (module by module) is worker/ct_offload.py's; its names stay importable here.


def config_groups(
    weights: dict[str, Any], input_activations: dict[str, Any] | None, fallbacks: dict[str, int | None]
) -> dict[str, Any]:
    """compressed-tensors config groups: ``group_0`` for every targeted Linear, then one group per
    fallback group size (core/methods/_ct.py ``group_fallbacks``: layers the requested group size
    does not divide) naming its layers exactly, which compressed-tensors and vLLM match before
    the class name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    acts = QuantizationArgs(**input_activations) if input_activations else None
    by_group: dict[int | None, list[str]] = {}
    for name, g in fallbacks.items():
        by_group.setdefault(g, []).append(name)
    out: dict[str, Any] = {}
    # The named groups come first: compressed-tensors' matcher marks a target as used only when it
    # is the first of a module's matches in this order, and warns of the others as unmatched.
    for i, g in enumerate(sorted(by_group, key=lambda g: -(g or 0)), start=1):
        w = {k: v for k, v in weights.items() if k not in ("strategy", "group_size")}
        w.update({"strategy": "group", "group_size": g} if g else {"strategy": "channel"})
        out[f"group_{i}"] = QuantizationScheme(
            targets=sorted(by_group[g]), weights=QuantizationArgs(**w), input_activations=acts
        )
    out["group_0"] = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights), input_activations=acts)
    return out


def layer_groups(
    method: str, group: int | None, widths: dict[str, int], strict: bool
) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(group size of every layer, the fallbacks among them) for ``group`` requested over layers of
    input widths ``widths``. ``strict``: a group size that does not divide every width is refused
    (the submit-time refusal, with the layers that block it), as it was before fallbacks."""
    from core.methods._ct import group_fallbacks, group_refusal

    if group and strict:
        refusal = group_refusal(method, group, widths)
        if refusal is not None:
            raise refusal
    fallbacks = group_fallbacks(group, widths)
    return {n: fallbacks.get(n, group) for n in widths}, fallbacks


def quantize_linear_layers(
    loaded: Any,
    *,
    method: str,
    weights: dict[str, Any],
    input_activations: dict[str, Any] | None,
    qparams: Callable[[Any, int | None], tuple[Any, Any]],
    ctx: MethodContext | None = None,
    strict_group: bool = False,
) -> dict[str, Any]:
    """Attach the scheme, store RTN scales from ``qparams(weight, group_size) -> (scale fp32,
    zero_point int8)``, set the compressed-tensors saver. Returns the step's metrics.
    ``strict_group``: refuse a group size that does not divide every layer instead of giving those
    layers a group size of their own (core/methods/_ct.py)."""
    import torch
    from compressed_tensors.compressors.format import infer_module_format

    from core.methods._ct import describe_fallbacks

    module, mods, names = _linear_targets(loaded, method)
    groups_cfg = config_groups(weights, input_activations, {})
    scheme = groups_cfg["group_0"]
    args = scheme.weights
    group = args.group_size if args.strategy == "group" else None
    _check_weights(method, mods, names)
    groups, fallbacks = layer_groups(method, group, {n: mods[n].weight.shape[1] for n in names}, strict_group)
    ignore = _attach_scheme(module, mods, names, config_groups(weights, input_activations, fallbacks))
    stats, per_layer = _store_scales(mods, names, qparams, groups, ctx)

    fmt = infer_module_format(torch.nn.Linear, scheme).value
    dtype = str(mods[names[0]].weight.dtype).removeprefix("torch.")
    running, stored = _memory(module, [mods[n] for n in names], args, fmt)
    loaded.saver = save_compressed
    loaded.notes.update(_notes(fmt, dtype, running, stored, bool(input_activations), ignore))
    return {
        "bits": args.num_bits,
        "group_size": group,
        "strategy": args.strategy,
        "symmetric": args.symmetric,
        "activations": (
            f"int{scheme.input_activations.num_bits} dynamic per-{scheme.input_activations.strategy}"
            if scheme.input_activations
            else None
        ),
        "format": fmt,
        "layers_quantized": len(names),
        "group_fallbacks": describe_fallbacks(fallbacks),
        "quantized_parameters": stats.elements,
        "ignored_layers": ignore,
        "relative_rms_error": round(stats.relative_rms_error, 8),
        "max_abs_error": stats.max_abs_err,
        "per_layer_relative_error": per_layer,
        "runs": RUNS_DECOMPRESSED,
    }


def _linear_targets(loaded: Any, method: str) -> tuple[Any, dict[str, Any], list[str]]:
    """(module, its modules by name, the names of the Linear layers to quantize). Refuses a bare
    state dict, an already quantized model, and Conv1D models (see the module's docstring)."""
    from transformers.pytorch_utils import Conv1D

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
    return module, mods, [t.name.removesuffix(".weight") for t in targets]


def _check_weights(method: str, mods: dict[str, Any], names: list[str]) -> None:
    for name in names:
        w = mods[name].weight
        if not w.is_floating_point():
            raise ValueError(f"{method}: {name}.weight is {w.dtype}, not floating point")


def _attach_scheme(module: Any, mods: dict[str, Any], names: list[str], groups: dict[str, Any]) -> list[str]:
    """Attach the config ``groups`` (:func:`config_groups`) to exactly the named layers
    (compressed-tensors creates their scale and zero point parameters); the names of the Linear
    layers left out."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    # The LM head (and any other Linear the targets leave out) is named in `ignore`: it stays in
    # the model's float dtype and the loader skips it.
    wanted = set(names)
    ignore = sorted(n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and n not in wanted)
    apply_quantization_config(module, QuantizationConfig(config_groups=groups, ignore=ignore), show_progress=False)
    attached = {n for n, m in module.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if attached != wanted:
        raise RuntimeError(f"compressed-tensors matched {sorted(attached ^ wanted)[:5]} differently from the targets")
    return ignore


def _store_scales(
    mods: dict[str, Any],
    names: list[str],
    qparams: Callable[[Any, int | None], tuple[Any, Any]],
    groups: dict[str, int | None],
    ctx: MethodContext | None,
) -> tuple[Any, dict[str, float]]:
    """Write every layer's scale and zero point into the parameters the library created, freeze
    the layer, and measure its quantization error; (error stats, relative error per layer)."""
    import torch
    from compressed_tensors.quantization import QuantizationStatus

    from worker.ops import quant

    stats = quant.ErrorStats()
    scratch = quant.Scratch()
    per_layer: dict[str, float] = {}
    every = max(1, len(names) // 10)
    with torch.no_grad():
        for i, name in enumerate(names):
            m = mods[name]
            w = m.weight.data
            args = m.quantization_scheme.weights  # the layer's own: its group size may be a fallback
            scale, zp = qparams(w, groups[name])
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))  # cast to the stored dtype
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
            # Measure with what is stored, exactly as the compressor will quantize.
            stored_zp = None if args.symmetric else m.weight_zero_point.data
            err = quant.quantize_error(w, m.weight_scale.data, stored_zp, args.num_bits, groups[name], scratch)
            per_layer[name] = round(stats.add_diff(w, err), 6)
            m.quantization_status = QuantizationStatus.FROZEN
            if ctx is not None and (i + 1) % every == 0:
                ctx.step_progress(f"{i + 1}/{len(names)} layers", (i + 1) / len(names))
    return stats, per_layer


def _notes(fmt: str, dtype: str, running: int, stored: int, activations: bool, ignore: list[str]) -> dict[str, Any]:
    """The LoadedModel's notes of a quantized result: its format, how it runs, its memory."""
    return {
        "format": f"compressed-tensors {fmt}",
        "runs": RUNS_DECOMPRESSED,
        # In memory once transformers has decompressed it (the first forward), and before that
        # (or in an engine that keeps the integers): parameters and buffers, tied ones once.
        "memory_bytes": running,
        "memory_bytes_compressed": stored,
        "runs_detail": (
            f"transformers + compressed-tensors on CPU dequantize the integer weights to {dtype} on the "
            "first forward pass; no integer matmul kernel runs"
            + (
                "; int8 activations are simulated per token (quantize-dequantize in floating point)"
                if activations
                else ""
            )
        ),
        "ignored_layers": ignore,
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
                stored += (
                    zp.numel()
                    if fmt != "pack-quantized"
                    else math.ceil(zp.shape[0] * args.num_bits / 32) * zp.shape[1] * 4
                )
        stored -= m.weight.numel() * m.weight.element_size()
        if fmt == "pack-quantized":
            stored += out_f * math.ceil(in_f * args.num_bits / 32) * 4 + 16  # int32 words + weight_shape
            running += 16  # weight_shape stays after decompression
        else:
            stored += out_f * in_f  # int8
    return running, stored


def skeleton_quantization_config(skeleton: Any, groups: dict[str, Any], ignore: list[str], names: list[str]) -> Any:
    """``quantization_config`` as the in-memory path's save writes it, for a streamed artifact: the
    schemes attached to the meta skeleton, its quantized layers ``names`` marked compressed (what the
    in-memory modules say once ``compress_model`` ran), read back by compressed-tensors'
    ModelCompressor. One function for every streamed quantizer (integer, FP8, FP4), so their
    configs cannot drift from the library's."""
    import json
    import tempfile

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    apply_quantization_config(skeleton, QuantizationConfig(config_groups=groups, ignore=ignore), show_progress=False)
    mods = dict(skeleton.named_modules())
    for n in names:
        mods[n].quantization_status = QuantizationStatus.COMPRESSED
    compressor = ModelCompressor.from_pretrained_model(skeleton)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text("{}")
        compressor.update_config(d)
        return json.loads((Path(d) / "config.json").read_text())["quantization_config"]


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


def attach_online_transforms(module: Any, artifact_dir: Path) -> int:
    """Re-attach an artifact's online rotations (``transform.rotate`` style ``quip``) after
    transformers loaded it: transformers 5.17 loads the weights (which hold the inverse rotation)
    but ignores ``quantization_config.transform_config``, so without this the model computes wrong
    outputs. compressed-tensors' own ``apply_transform_config`` attaches the online (``input`` /
    ``output``) transforms only, the weight-side ones being in the weights already, and the
    matrices are then overwritten with those the checkpoint stores (layers of one width share one
    matrix; the checkpoint keeps one name per shared tensor). Returns how many were attached."""
    import json

    import torch
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase
    from safetensors import safe_open

    qc = json.loads((artifact_dir / "config.json").read_text()).get("quantization_config") or {}
    tc = qc.get("transform_config") or {}
    if not tc.get("config_groups"):
        return 0
    config = TransformConfig.model_validate(tc)
    for scheme in config.config_groups.values():
        scheme.apply = [a for a in scheme.apply if a.is_online()]
    config.config_groups = {k: s for k, s in config.config_groups.items() if s.apply}
    if not config.config_groups:
        return 0
    apply_transform_config(module, config)
    stored: dict[str, torch.Tensor] = {}
    for f in sorted(artifact_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is no dict
                if any(key.endswith(f".{g}_{loc}.weight") for g in config.config_groups for loc in ("input", "output")):
                    stored[key] = st.get_tensor(key)
    by_kind: dict[tuple[str, int], torch.Tensor] = {}
    for key, t in stored.items():
        by_kind[(key.rsplit(".", 2)[-2], t.shape[0])] = t
    attached = 0
    with torch.no_grad():
        for name, m in module.named_modules():
            if not isinstance(m, TransformBase):
                continue
            w = m.weight
            src = stored.get(f"{name}.weight")
            if src is None:
                src = by_kind.get((name.rsplit(".", 1)[-1], w.shape[0]))
            if src is None or src.shape != w.shape:
                raise ValueError(f"the artifact has no stored matrix for the online rotation {name}")
            w.data.copy_(src.to(w.dtype))
            attached += 1
    return attached
