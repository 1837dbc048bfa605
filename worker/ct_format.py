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
are written by :func:`save_offloaded`: the files llm-compressor's ``save_pretrained`` writes, one
module at a time instead of the whole model gathered.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.methods._ct import CONV1D_REFUSAL, RUNS_DECOMPRESSED
from worker.context import MethodContext


def quantize_linear_layers(
    loaded: Any,
    *,
    method: str,
    weights: dict[str, Any],
    input_activations: dict[str, Any] | None,
    qparams: Callable[[Any], tuple[Any, Any]],
    ctx: MethodContext | None = None,
) -> dict[str, Any]:
    """Attach the scheme, store RTN scales from ``qparams(weight) -> (scale fp32, zero_point
    int8)``, set the compressed-tensors saver. Returns the step's metrics."""
    import torch
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    module, mods, names = _linear_targets(loaded, method)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**weights),
        input_activations=QuantizationArgs(**input_activations) if input_activations else None,
    )
    args = scheme.weights
    group = args.group_size if args.strategy == "group" else None
    _check_weights(method, mods, names, group)
    ignore = _attach_scheme(module, mods, names, scheme)
    stats, per_layer = _store_scales(mods, names, qparams, args, group, ctx)

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


def _check_weights(method: str, mods: dict[str, Any], names: list[str], group: int | None) -> None:
    for name in names:
        w = mods[name].weight
        if not w.is_floating_point():
            raise ValueError(f"{method}: {name}.weight is {w.dtype}, not floating point")
        if group and w.shape[1] % group:
            raise ValueError(f"{method}: {name} has {w.shape[1]} input features, not a multiple of group_size {group}")


def _attach_scheme(module: Any, mods: dict[str, Any], names: list[str], scheme: Any) -> list[str]:
    """Attach ``scheme`` to exactly the named layers (compressed-tensors creates their scale and
    zero point parameters); the names of the Linear layers left out."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    # The LM head (and any other Linear the targets leave out) is named in `ignore`: it stays in
    # the model's float dtype and the loader skips it.
    wanted = set(names)
    ignore = sorted(n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and n not in wanted)
    apply_quantization_config(
        module, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore), show_progress=False
    )
    attached = {n for n, m in module.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if attached != wanted:
        raise RuntimeError(f"compressed-tensors matched {sorted(attached ^ wanted)[:5]} differently from the targets")
    return ignore


def _store_scales(
    mods: dict[str, Any],
    names: list[str],
    qparams: Callable[[Any], tuple[Any, Any]],
    args: Any,
    group: int | None,
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


# --- saving a disk-offloaded model module by module (the block path) -------------------------------


def offloaded_save_refusal(model: Any) -> str | None:
    """Why :func:`save_offloaded` cannot write ``model`` exactly as llm-compressor's
    ``save_pretrained`` would, or None. Checked before anything is written."""
    from transformers.modeling_utils import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return "not a transformers model"
    if not getattr(model.save_pretrained, "_overridden", False):
        # Only llm-compressor's wrapper is reproduced (its config rewrite, its compression).
        return "save_pretrained is not llm-compressor's"
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "_hf_peft_config_loaded", False):
        return "the model was loaded quantized or with adapters"
    if getattr(model, "_tp_size", None) is not None:
        return "tensor parallel"
    if _weight_conversions(model):
        # transformers reverts load-time conversions (fused MoE experts...) on save; a converter can
        # need tensors of several modules at once, which a module-by-module writer does not have.
        return "the model has load-time weight conversions to revert"
    text = model.config.get_text_config()
    if getattr(text, "num_mtp_layers", 0) or getattr(text, "mtp_num_hidden_layers", 0):
        return "multi-token-prediction layers"
    if model._keys_to_ignore_on_save:
        return "keys to ignore on save"
    try:
        from llmcompressor.utils.transformers import get_embeddings
    except ImportError:
        return "llm-compressor is not installed"
    for emb in get_embeddings(model):
        # _retie_embeddings runs after compression in the wrapper: with a quantized embedding it
        # would compare compressed tensors, which this writer never builds in the module.
        if emb is not None and getattr(emb, "quantization_scheme", None) is not None:
            return "a quantized embedding"
    return None


def _weight_conversions(model: Any) -> list[Any]:
    """The conversions transformers' ``revert_weight_conversion`` would undo on save (same rule)."""
    conv = getattr(model, "_weight_conversions", None)
    if conv is None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange

        conv = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return list(conv or [])


@dataclass
class _Out:
    """One output tensor, planned: which module makes it and under which local name."""

    name: str
    module: Any
    local: str
    compressed: bool  # produced by the module's compressor (else read as stored)
    spec: Any  # worker.stream.shards.TensorSpec


def save_offloaded(model: Any, out_dir: Path, max_shard_size: int) -> None:
    """Write an offloaded (disk-offload) model exactly as llm-compressor's ``save_pretrained``
    wrapper does (``compress_model`` + transformers' ``save_pretrained`` + its config rewrites), but
    one module at a time: a module's tensors are onloaded from the offload files, compressed by the
    compressor class ``compress_module`` would use, written into the shard being filled, and
    dropped. The wrapper instead compresses the whole model in place and lets transformers gather
    each output shard in memory (measured: 0.07-0.96x the model, depending on the run and on how
    many shards it makes; this writer: one module and one embedding table at a time).

    Every output tensor's name, dtype and shape is found first without reading a weight: the
    compressor runs on the offloaded ``meta`` tensors. So each shard's safetensors header is written
    before its data (the streaming engine's writer, worker/stream/shards.py), and each tensor, once
    computed, is checked against its plan. The module is never changed (no compressed tensor is
    written back to the offload files); only what the wrapper also sets is set: each scheme's
    ``format``, the quantization config's status, re-tied embeddings.

    Call :func:`offloaded_save_refusal` first."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.offload import disable_onloading
    from compressed_tensors.quantization import QuantizationStatus
    from llmcompressor.pytorch.model_load.helpers import copy_python_files_from_model_cache
    from llmcompressor.transformers.compression.compressed_tensors_utils import _retie_embeddings, resave_config

    compressor = ModelCompressor.from_pretrained_model(model)
    _retie(model, _retie_embeddings)
    plan = _plan(model, compressor)
    shards = _hf_layout([o.spec for o in plan], max_shard_size)

    # config.json and generation_config.json as transformers' save_pretrained writes them (dtype and
    # architectures set first), then llm-compressor's rewrite from the original config and its
    # quantization_config, in the wrapper's order.
    with disable_onloading():  # the dtype is the meta tensors'; nothing read from disk
        dtype = model.dtype
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)

    _write_shards(plan, shards, out_dir, compressor)

    if len(shards) > 1:
        _write_index(shards, plan, out_dir)
    resave_config(model.config, str(out_dir))
    if compressor.quantization_config is not None:
        # compress_model marks the config compressed before update_config writes it.
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    compressor.update_config(str(out_dir))
    copy_python_files_from_model_cache(model, str(out_dir))


# Rows of the two embedding tables compared before llm-compressor compares them whole.
RETIE_PROBE_ROWS = 64


def _retie(model: Any, retie_embeddings: Callable[[Any], None]) -> None:
    """The wrapper's re-tie step (llm-compressor's private ``_retie_embeddings``: tables holding the
    same values are made one, written once, and config.json says ``tie_word_embeddings``), without
    its cost where the answer is known: it onloads both tables whole to compare them, 2 x vocab x
    hidden (2 GiB of bf16 for a 128k vocabulary at hidden 4096), more than a block. Tables that
    are one offloaded tensor already get its side effect (the config flag) directly; tables whose
    first rows differ are left alone, as it would leave them; anything else goes to it."""
    import torch
    from compressed_tensors.offload import disable_onloading
    from llmcompressor.utils.transformers import get_embeddings

    inp, out = get_embeddings(model)
    if inp is None or out is None or inp is out:
        retie_embeddings(model)  # returns at once
        return
    with disable_onloading():  # the offloaded (meta) tensors: nothing read
        ta, tb = _own_tensors(inp), _own_tensors(out)
    if ta.keys() != tb.keys():
        retie_embeddings(model)  # returns at once
        return
    if all(ta[k] is tb[k] for k in ta):
        # Equal by construction; its setattr would assign the tensor to itself.
        config = getattr(model, "config", None)
        get_text_config = getattr(config, "get_text_config", None)
        text_config = get_text_config(decoder=True) if callable(get_text_config) else config
        if text_config is not None:
            text_config.tie_word_embeddings = True
        return
    with torch.no_grad():
        for k in ta:
            a, b = _first_rows(inp, k, ta[k]), _first_rows(out, k, tb[k])
            if a is None or b is None:
                break
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                return  # not the same table: it would return without a change
    retie_embeddings(model)


def _own_tensors(module: Any) -> dict[str, Any]:
    """A module's own non-None parameters and buffers, as ``_retie_embeddings`` lists them."""
    names = list(module._parameters.keys()) + list(module._buffers.keys())
    return {n: t for n in names if (t := getattr(module, n)) is not None}


def _first_rows(module: Any, name: str, offloaded: Any) -> Any:
    """The first RETIE_PROBE_ROWS rows of a tensor as onloading would give them, read from its
    offload file alone; None where that cannot be done without onloading all of it."""
    import torch
    from compressed_tensors.offload.cache.disk import DiskCache
    from safetensors import safe_open

    store = module._parameters if name in module._parameters else module._buffers
    if not isinstance(store, DiskCache):
        return offloaded[:RETIE_PROBE_ROWS] if offloaded.device.type != "meta" and offloaded.ndim else None
    info = DiskCache.index.get(offloaded)
    if info is None or offloaded.ndim == 0:
        return None
    with safe_open(info["safetensors_file"], framework="pt", device="cpu") as f:
        part = f.get_slice(info["weight_name"])[:RETIE_PROBE_ROWS]
    return part.to(getattr(torch, info["dtype"]))


def _format(module: Any, compressor: Any) -> Any:
    """The compressor class ``compress_module`` picks, setting ``scheme.format`` as it does (the
    schemes are shared with the quantization config that goes into config.json)."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat

    scheme = module.quantization_scheme
    scheme.format = CompressionFormat(
        compressor.force_compression_format or scheme.format or infer_module_format(type(module), scheme)
    )
    return BaseCompressor.get_value_from_registry(scheme.format.value)


def _compressed_here(module: Any) -> bool:
    """``compress_model(skip_compressed=True)``'s choice of modules."""
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.utils.helpers import is_module_quantized

    return (
        is_module_quantized(module)
        and isinstance(getattr(module, "quantization_scheme", None), QuantizationScheme)
        and getattr(module, "quantization_status", None) != QuantizationStatus.COMPRESSED
    )


def _plan(model: Any, compressor: Any) -> list[_Out]:
    """The tensors transformers' save_pretrained would write after compress_model, in its order
    (state_dict order: the wrapper saves through accelerate's offload, so transformers cuts shards
    in that order; tied weights removed by transformers' own rule), with their specs."""
    import torch
    from compressed_tensors.offload import disable_onloading
    from compressed_tensors.utils import get_direct_state_dict
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from worker.stream.shards import TensorSpec

    outs: dict[str, _Out] = {}
    # What remove_tied_weights_from_state_dict sees: offloaded (meta) tensors for stored weights,
    # which it keys by the module's own tensor (shared when tied); a distinct object for each
    # compressed output (fresh tensors, never tied).
    probe: dict[str, Any] = {}
    with disable_onloading(), torch.no_grad():

        def walk(module: Any, prefix: str) -> None:
            if _compressed_here(module):
                cls = _format(module, compressor)
                state = get_direct_state_dict(module)
                meta = {k: (v if v.device.type == "meta" else v.to("meta")) for k, v in state.items() if v is not None}
                for local, t in cls.compress(meta, module.quantization_scheme).items():
                    name = prefix + local
                    outs[name] = _Out(name, module, local, True, TensorSpec(name, t.dtype, tuple(t.shape)))
                    probe[name] = object()
            else:
                for local, t in module._parameters.items():
                    if t is not None:
                        _add_stored(module, prefix, local, t)
                for local, t in module._buffers.items():
                    if t is not None and local not in module._non_persistent_buffers_set:
                        _add_stored(module, prefix, local, t)
            for child_name, child in module._modules.items():
                if child is not None:
                    walk(child, f"{prefix}{child_name}.")

        def _add_stored(module: Any, prefix: str, local: str, t: Any) -> None:
            name = prefix + local
            outs[name] = _Out(name, module, local, False, TensorSpec(name, t.dtype, tuple(t.shape)))
            probe[name] = t if t.device.type == "meta" else t.detach()

        walk(model, "")
        kept = remove_tied_weights_from_state_dict(dict(probe), model)
    return [outs[n] for n in kept]


def _hf_layout(specs: list[Any], max_bytes: int) -> list[Any]:
    """Shards as huggingface_hub's ``split_torch_state_dict_into_shards`` cuts them (a tensor
    larger than the cap gets a shard of its own, placed before the one being filled), named as
    save_pretrained names them."""
    from worker.stream.shards import Shard

    groups: list[list[Any]] = []
    current: list[Any] = []
    size = 0
    for s in specs:
        if s.nbytes > max_bytes:
            groups.append([s])
            continue
        if size + s.nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current:
        groups.append(current)
    meta = {"format": "pt"}
    if len(groups) <= 1:
        return [Shard("model.safetensors", groups[0] if groups else [], meta)]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, meta) for i, g in enumerate(groups)]


def _write_shards(plan: list[_Out], shards: list[Any], out_dir: Path, compressor: Any) -> None:
    """Each shard's header, then its tensors in order. A compressed module's outputs are computed
    together and held until written (they may straddle a shard boundary); nothing else is kept."""
    import torch
    from compressed_tensors.utils import get_direct_state_dict

    from worker.stream.shards import tensor_bytes
    from worker.stream.sinks import DirSink

    by_name = {o.name: o for o in plan}
    pending: dict[str, torch.Tensor] = {}  # outputs of the compressed module being written
    sink = DirSink(out_dir)
    with torch.no_grad():
        for shard in shards:
            header = shard.header()
            w = sink.open(shard.filename, len(header) + shard.data_bytes, weights=True)
            try:
                w.write(header)
                for spec in shard.specs:
                    o = by_name[spec.name]
                    if o.name in pending:
                        t = pending.pop(o.name)
                    elif o.compressed:
                        # compress_module's input: every tensor of the module, onloaded.
                        state = get_direct_state_dict(o.module)
                        prefix = o.name[: len(o.name) - len(o.local)]
                        made = _format(o.module, compressor).compress(state, o.module.quantization_scheme)
                        del state
                        pending.update({prefix + k: v for k, v in made.items() if prefix + k in by_name})
                        t = pending.pop(o.name)
                    else:
                        t = getattr(o.module, o.local)  # onloaded from the offload file
                    t = t.detach()
                    if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                        raise RuntimeError(
                            f"{spec.name}: planned {spec.dtype} {spec.shape}, made {t.dtype} {tuple(t.shape)}"
                        )
                    w.write(tensor_bytes(t))
                    del t
            finally:
                w.close()
    if pending:
        raise RuntimeError(f"outputs computed but not written: {sorted(pending)[:3]}")


def _write_index(shards: list[Any], plan: list[_Out], out_dir: Path) -> None:
    """model.safetensors.index.json as save_pretrained writes it. ``total_parameters`` is what
    ``num_parameters()`` counts on the compressed model: every parameter once (compressed outputs
    become parameters), buffers not."""
    import json

    params = sum(_numel(o.spec.shape) for o in plan if o.compressed or o.local in o.module._parameters)
    index = {
        "metadata": {"total_parameters": params, "total_size": sum(sh.data_bytes for sh in shards)},
        "weight_map": {s.name: sh.filename for sh in shards for s in sh.specs},
    }
    with open(out_dir / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
