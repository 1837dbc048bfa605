"""Loading uploaded models and saving results. Never unpickles: weights come only from safetensors,
classes only from transformers itself (``trust_remote_code`` stays off)."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from worker import ct_offload

# Tensors of a bare state dict that are embeddings or output heads, by name: never pruned.
EMBEDDING_NAME_PATTERNS = ("*embed*", "*wte*", "*wpe*", "*lm_head*", "*shared.weight", "*position*")
# Files of an HF directory copied through to the result unchanged (tokenizer, generation config).
WEIGHT_FILE_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json")


@dataclass
class Target:
    name: str  # "<module>.weight" (HF) or the state-dict key (bare)
    weight: torch.Tensor
    row_dim: int  # dim that indexes output features (0 nn.Linear, 1 GPT-2 Conv1D)


@dataclass
class LoadedModel:
    format: str  # "hf" | "safetensors"
    src_dir: Path
    module: nn.Module | None = None
    state: dict[str, torch.Tensor] | None = None
    extra_files: list[Path] = field(default_factory=list)
    # A method that changes how weights are stored (e.g. compressed-tensors quantization) sets
    # this; save() then calls saver(self, out_dir, max_shard_size) instead of save_pretrained/save_file.
    saver: Callable[[LoadedModel, Path, int], None] | None = None
    # Facts for the report about how the artifact's weights are stored / run.
    notes: dict[str, Any] = field(default_factory=dict)
    # Keys merged into the saved config.json whatever writes it (llm-compressor's save_pretrained
    # re-saves the config from its own copy and would drop attributes set on the module's).
    config_extra: dict[str, Any] = field(default_factory=dict)

    def targets(self, include: list[str] | None = None, exclude: list[str] | None = None) -> list[Target]:
        """Weights that compression methods act on: every nn.Linear and GPT-2 Conv1D weight except
        the input embeddings and the LM head (HF), or every 2-D float ``*.weight`` tensor whose name
        is not an embedding/head (bare state dicts)."""
        out: list[Target] = []
        if self.module is not None:
            from transformers.pytorch_utils import Conv1D

            skip = set()
            for getter in ("get_input_embeddings", "get_output_embeddings"):
                try:
                    m = getattr(self.module, getter)()
                except (AttributeError, NotImplementedError):
                    m = None
                if m is not None:
                    skip.add(id(m))
            for name, mod in self.module.named_modules():
                if id(mod) in skip or not isinstance(mod, (nn.Linear, Conv1D)):
                    continue
                if not _selected(name, include, exclude):
                    continue
                out.append(Target(f"{name}.weight", mod.weight.data, 1 if isinstance(mod, Conv1D) else 0))
        else:
            assert self.state is not None
            for name, t in self.state.items():
                if t.ndim != 2 or not t.is_floating_point() or not name.endswith(".weight"):
                    continue
                if any(fnmatch.fnmatch(name, p) for p in EMBEDDING_NAME_PATTERNS):
                    continue
                if not _selected(name.removesuffix(".weight"), include, exclude):
                    continue
                out.append(Target(name, t, 0))
        return out


def unique_tensors(module: nn.Module, buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers, tied ones once. On a disk-offloaded module every read gives a fresh
    copy, so sharing is told by the offloaded tensor behind the name, not by the copy."""
    try:
        from compressed_tensors.offload.cache import OffloadCache
    except ImportError:  # pragma: no cover - compressed-tensors is a dependency
        OffloadCache = ()  # type: ignore[assignment]  # noqa: N806
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for store in (mod._parameters, mod._buffers) if buffers else (mod._parameters,):
            offloaded = store.offloaded_values if isinstance(store, OffloadCache) else None
            for name in list(store.keys()):
                key = offloaded.get(name) if offloaded is not None else store.get(name)
                if key is None or id(key) in seen:
                    continue
                seen.add(id(key))
                out.append((f"{mod_name}.{name}" if mod_name else name, store[name]))
    return out


def is_offloaded(module: nn.Module | None) -> bool:
    from compressed_tensors.offload.cache import OffloadCache

    return module is not None and any(isinstance(m._parameters, OffloadCache) for m in module.modules())


def _weights_on_disk(module: nn.Module) -> bool:
    from compressed_tensors.offload.cache.disk import DiskCache

    return any(isinstance(m._parameters, DiskCache) for m in module.modules())


def _selected(name: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def model_class(config: Any) -> type:
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"architecture {arch!r} is not a transformers model class")
    return cls


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings take, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def preload() -> None:
    """Import transformers' model code once, in the worker's main process before the pool forks:
    it is ~250 MB of resident memory that every pool child then shares instead of importing it
    again on its first job (which would also count against that job's memory limit,
    worker/limits.py). Architectures not named here are imported by their first job."""
    import transformers.modeling_utils  # noqa: F401
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401


def load(src_dir: Path, fmt: str, offload_dir: Path | None = None) -> LoadedModel:
    """The model in memory; with ``offload_dir`` (HF models), its skeleton with every weight left on
    disk (compressed-tensors' disk offload: each parameter is read from the shards when a module
    runs or is read, and what a method writes goes to ``offload_dir``), for steps that onload one
    block at a time (``MethodSpec.blocks``)."""
    if fmt == "safetensors":
        (path,) = list(src_dir.glob("*.safetensors"))
        return LoadedModel(format=fmt, src_dir=src_dir, state=load_file(str(path)))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src_dir, trust_remote_code=False)
    cls = model_class(config)
    # dtype="auto": keep the stored dtype (a cast is a method, not a side effect of loading).
    kwargs: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True, "dtype": "auto"}
    if offload_dir is None:
        module = cls.from_pretrained(src_dir, **kwargs)
    else:
        from compressed_tensors.offload import load_offloaded_model

        offload_dir.mkdir(parents=True, exist_ok=True)
        # No CPU memory for weights at all: every parameter is offloaded to disk, so what the
        # worker holds is one block being worked on, not the model.
        with load_offloaded_model(cls):
            module = cls.from_pretrained(
                src_dir, device_map="auto_offload", max_memory={"cpu": 1}, offload_folder=str(offload_dir), **kwargs
            )
    module.eval()
    extras = [
        p
        for p in src_dir.iterdir()
        if p.is_file() and not any(fnmatch.fnmatch(p.name, pat) for pat in WEIGHT_FILE_PATTERNS)
    ]
    return LoadedModel(format=fmt, src_dir=src_dir, module=module, extra_files=extras)


# Output shards hold at most this many bytes (HF's 5 GB; transformers 5's own default is 50 GB).
# save_pretrained holds one shard's tensors in memory at a time; the block path's module-by-module
# writer (ct_offload.save_offloaded) holds one module whatever the shard size.
DEFAULT_SHARD_BYTES = 5 * 10**9


def _saves_module_by_module(model: LoadedModel) -> bool:
    """The block path's save: the model's weights are on disk (``load(..., offload_dir)``) and what
    would write them is llm-compressor's ``save_pretrained`` (every block method runs through
    llm-compressor: its saver, worker/llmc.py ``set_quantized_saver``, or no saver at all), which
    compresses and gathers the whole model in memory (~the model's size). ct_offload.save_offloaded
    writes the same files one module at a time. Another saver, or a model that writer cannot
    reproduce exactly (ct_offload.offloaded_save_refusal), keeps the gathering save."""
    if model.module is None or not _weights_on_disk(model.module):
        # In memory (llm-compressor's pipeline leaves it in a CPU offload cache) the weights are
        # held anyway: the in-memory path keeps the library's own save, the reference of the tests.
        return False
    # llm-compressor's saver is told by its name (worker/llmc.py is not this module's to mark it);
    # tests/test_blocks.py asserts every block method's result is saved here, so a rename fails there.
    if model.saver is not None and getattr(model.saver, "__qualname__", "") != "set_quantized_saver.<locals>.saver":
        return False
    reason = ct_offload.offloaded_save_refusal(model.module)
    if reason is not None:
        import logging

        logging.getLogger("modelpress.worker").info("offloaded model saved whole (save_pretrained): %s", reason)
        return False
    return True


def save(
    model: LoadedModel, out_dir: Path, manifest: dict[str, Any], max_shard_size: int = DEFAULT_SHARD_BYTES
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.module is None:
        assert model.state is not None
        # A bare state dict stays one file: the manifest goes in the safetensors metadata.
        save_file(
            {k: v.contiguous() for k, v in model.state.items()},
            str(out_dir / "model.safetensors"),
            metadata={"modelpress": json.dumps(manifest, sort_keys=True)},
        )
        return
    with _compact_online_transforms(model.module):
        _save_module(model, out_dir, max_shard_size)
    if model.config_extra:
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(model.config_extra)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # llm-compressor writes the recipe it ran; modelpress.json records the job's steps instead.
    (out_dir / "recipe.yaml").unlink(missing_ok=True)
    (out_dir / "modelpress.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


@contextlib.contextmanager
def _compact_online_transforms(module: Any) -> Iterator[int]:
    """While saving: the online rotations' matrices (``transform.rotate`` style ``quip``) held in
    the model's dtype instead of compressed-tensors' float64, where that changes no value.
    Hadamard matrices are stored unnormalized (entries of +-1; the 1/sqrt(n) is applied when they
    run), so every float dtype holds them exactly, and vLLM loads them in the model's dtype
    whatever the checkpoint holds: float64 only made the artifact larger (a Llama-2-7B's 4096- and
    11008-wide matrices: ~1.1 GB in float64, ~0.27 GB in bf16). Restored afterwards, so the model
    in memory computes as before. Yields how many matrices were cast."""
    from compressed_tensors.transform.factory.base import TransformBase

    dtype = getattr(module, "dtype", None)
    swapped: dict[int, tuple[Any, Any]] = {}  # id(parameter) -> (parameter, its float64 data)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        for m in module.modules():
            w = getattr(m, "weight", None)
            if not isinstance(m, TransformBase) or not m.args.is_online() or id(w) in swapped:
                continue
            if w is None or w.device.type == "meta" or w.dtype == dtype or not w.dtype.is_floating_point:
                continue
            cast = w.data.to(dtype)
            if torch.equal(cast.to(w.dtype), w.data):  # exact, or it stays as it is
                swapped[id(w)] = (w, w.data)
                w.data = cast
    try:
        yield len(swapped)
    finally:
        for w, data in swapped.values():
            w.data = data


def _save_module(model: LoadedModel, out_dir: Path, max_shard_size: int) -> None:
    assert model.module is not None
    if _saves_module_by_module(model):
        ct_offload.save_offloaded(model.module, out_dir, max_shard_size)
        # As after the saver or save_pretrained it stands for: the source's files where those did
        # not write their own (a saver's generation_config.json is kept, save_pretrained's is not).
        for p in model.extra_files:
            if model.saver is None or not (out_dir / p.name).exists():
                shutil.copyfile(p, out_dir / p.name)
    elif model.saver is not None:
        model.saver(model, out_dir, max_shard_size)
        for p in model.extra_files:
            if not (out_dir / p.name).exists():
                shutil.copyfile(p, out_dir / p.name)
    else:
        model.module.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
        for p in model.extra_files:
            shutil.copyfile(p, out_dir / p.name)
