"""Saving a disk-offloaded model module by module: the block path's save (model_io.save runs it
for the llm-compressor methods' results, see ``model_io._saves_module_by_module``).

It writes the files llm-compressor's ``save_pretrained`` wrapper writes, one module at a time
instead of the whole model gathered. It sits apart from worker/ct_format.py (the quantize.*
methods' scheme, scales and saver), which imports the handlers' context: model_io imports this
module, so this one imports nothing of the worker that imports model_io (worker/shards.py and
worker/sinks.py do not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.shards import Shard, TensorSpec, tensor_bytes
from worker.sinks import DirSink


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
    spec: TensorSpec


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
    before its data (the streaming engine's writer, worker/shards.py), and each tensor, once
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
