"""The methods that run through llm-compressor (Wanda, SparseGPT, GPTQ, SmoothQuant, AWQ) share
this: submit-time checks, the calibration set, the ``oneshot`` call and the saver.

Why llm-compressor: it is where these algorithms are maintained (vLLM project), it runs them
layer by layer (its ``sequential`` pipeline traces the model into one subgraph per decoder layer
and calibrates them one after the other, so only one layer's activations are alive at a time), and
it writes compressed-tensors checkpoints that transformers and vLLM load. We add the service parts:
refusals at submit with a reason, calibration from the job's dataset, progress and metrics.

The parameter models and submit-time checks are core/methods/_llmc.py's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.methods._llmc import SCHEMES, CalibrationParams
from worker.context import MethodContext, Metrics

if TYPE_CHECKING:
    from worker.model_io import LoadedModel

# exact_offset_norms patches a llm-compressor class for the length of a oneshot call: one at a time
# per process (oneshot itself keeps a process-wide session, so two at once were never safe).
_NORMS_PATCH = threading.Lock()


def config_groups(
    scheme: str,
    group_size: int | None,
    fallbacks: dict[str, int | None] | None = None,
    observer: str | None = None,
) -> dict[str, Any]:
    """The compressed-tensors schemes of a step: ``group_size`` null is one scale per output
    channel; ``fallbacks`` (:func:`group_fallbacks`) give the layers it does not divide a config
    group of their own; ``observer`` ``"mse"`` searches each scale for the least squared error
    (llm-compressor's memoryless MSE observer) instead of taking the min/max range."""
    from worker.ct_format import config_groups as ct_groups

    spec = SCHEMES[scheme]
    weights = {
        **spec["weights"],
        **({"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"}),
    }
    if observer == "mse":
        # What llm-compressor turns "mse" into for weights anyway (memoryless: no running state).
        weights["observer"] = "memoryless_mse"
    return ct_groups(weights, spec["input_activations"], fallbacks or {})


def group_fallbacks(model: LoadedModel, method: str, group_size: int | None, params: Any) -> dict[str, int | None]:
    """The Linear layers of ``model`` (the step's ``ignore`` left out) that ``group_size`` does not
    divide, each with the group size it gets instead (core/methods/_ct.py); with
    ``params.strict_group_size`` such a layer refuses the job (the submit-time check, again with
    every layer's real width)."""
    import torch

    from core.methods._ct import ignored
    from worker.ct_format import layer_groups

    if not group_size:
        return {}
    widths = {
        name: m.in_features
        for name, m in model.module.named_modules()
        if isinstance(m, torch.nn.Linear) and not ignored(name, params.ignore)
    }
    return layer_groups(method, group_size, widths, bool(getattr(params, "strict_group_size", False)))[1]


# --- worker side ----------------------------------------------------------------------------------


def calibration_dataset(
    model: LoadedModel, ctx: MethodContext, params: CalibrationParams
) -> tuple[Any, dict[str, Any]]:
    """The job's dataset, tokenized with the model's tokenizer, as the ``datasets.Dataset`` of
    ``input_ids``/``attention_mask`` that ``oneshot`` takes (no download, no remote code)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.src_dir, trust_remote_code=False)
    texts = [s["text"] for s in ctx.samples("train")][: params.num_samples]
    from worker.model_io import max_positions

    limit = max_positions(model.module.config)
    max_len = min(params.max_length, limit) if limit else params.max_length
    enc = tok(texts, truncation=True, max_length=max_len)
    rows = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > 0]
    columns = {k: [enc[k][i] for i in rows] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    info = {
        "calibration_samples": len(rows),
        "calibration_tokens": sum(len(enc["input_ids"][i]) for i in rows),
        "max_length": max_len,
    }
    if not rows:
        raise ValueError("the dataset has no text to calibrate on")
    return Dataset.from_dict(columns), info


def run_oneshot(model: LoadedModel, ctx: MethodContext, recipe: list[Any], params: CalibrationParams) -> Metrics:
    """Calibrate and apply ``recipe`` to ``model.module`` in place, layer by layer."""
    import torch

    from worker.spill import spill_activations

    if model.module is None:
        raise ValueError("llm-compressor methods need a transformers model directory (config.json)")
    dataset, info = calibration_dataset(model, ctx, params)
    ctx.step_progress(f"calibrating on {info['calibration_samples']} samples", 0.05)
    t0 = time.perf_counter()
    settings = getattr(ctx, "settings", None)
    budget = (settings.activation_memory_mb if settings is not None else 1024) << 20
    scratch = Path(getattr(ctx, "work_dir", None) or tempfile.gettempdir()) / f"activations-{os.getpid()}"
    try:
        with spill_activations(scratch, budget) as spill, exact_offset_norms() as norms:
            _oneshot(model, dataset, recipe, info)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the files were unlinked when mapped: the folder
    model.module.eval()
    return {
        **info,
        "pipeline": "sequential",
        "oneshot_seconds": round(time.perf_counter() - t0, 4),
        "device": str(next(model.module.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        **spill.summary(),
        **norms,
    }


@contextlib.contextmanager
def exact_offset_norms() -> Iterator[dict[str, int]]:
    """llm-compressor's swap of offset norms (Gemma 1-3, Qwen3-Next: ``output * (1 + weight)``),
    with its two faults mended, while ``oneshot`` runs.

    ``oneshot`` replaces each such norm by one holding ``1 + weight`` (so AWQ and SmoothQuant can fold
    scales into it) and afterwards writes ``weight - 1`` back. (1) Both are rounded to the weight's
    dtype, so in bf16 every job moved the norms of a Gemma model, whatever the method (up to 0.06 on
    Gemma 3 270M's, several % of its perplexity): a norm the recipe did not change now gets its
    original value back, bit for bit. (2) The write-back set ``.data`` on the original module, which
    on the block path (weights in compressed-tensors' disk offload) never reaches the offloaded
    weight the save reads, so AWQ's and SmoothQuant's smoothing of those norms was lost and the
    artifact was wrong: it now goes through ``update_offload_parameter``. The dict (filled on exit)
    counts the norms for the job's metrics."""
    import torch
    from compressed_tensors.utils import update_offload_parameter
    from llmcompressor.modeling.offset_norm import CalibrationOffsetNorm

    counts = {"offset_norms_restored": 0, "offset_norms_smoothed": 0}

    def patched_init(self: Any, original: torch.nn.Module, config: Any) -> None:
        init(self, original, config)
        self._mp_original = original.weight.detach().clone()
        self._mp_entered = self.weight.detach().clone()

    def patched_restore(self: Any, original: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            if torch.equal(self.weight.detach(), self._mp_entered):
                value = self._mp_original
                counts["offset_norms_restored"] += 1
            else:
                value = (self.weight.detach().float() - 1.0).to(self._orig_dtype)
                counts["offset_norms_smoothed"] += 1
            update_offload_parameter(original, "weight", value)
        return original

    with _NORMS_PATCH:
        init, restore = CalibrationOffsetNorm.__init__, CalibrationOffsetNorm.restore
        CalibrationOffsetNorm.__init__ = patched_init  # type: ignore[method-assign]
        CalibrationOffsetNorm.restore = patched_restore  # type: ignore[method-assign]
        try:
            yield counts
        finally:
            CalibrationOffsetNorm.__init__ = init  # type: ignore[method-assign]
            CalibrationOffsetNorm.restore = restore  # type: ignore[method-assign]
    if not any(counts.values()):
        counts.clear()


def _oneshot(model: Any, dataset: Any, recipe: list[Any], info: dict[str, Any]) -> None:
    from llmcompressor import oneshot

    oneshot(
        model=model.module,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=info["calibration_samples"],
        max_seq_length=info["max_length"],
        # One decoder layer at a time: peak memory is the model plus one layer's activations.
        pipeline="sequential",
        shuffle_calibration_samples=False,
        output_dir=None,
        log_dir=None,
    )


def set_quantized_saver(model: Any, method: str) -> None:
    """Quantized results are written by llm-compressor's own ``save_pretrained`` (oneshot wrapped
    the model's): packed integers + ``quantization_config`` (compressed-tensors) in config.json."""

    def saver(loaded: Any, out_dir: Path, max_shard_size: int) -> None:
        loaded.module.save_pretrained(out_dir, save_compressed=True, max_shard_size=max_shard_size)

    model.saver = saver
    model.notes["format"] = "compressed-tensors"
    model.notes["written_by"] = f"{method} via llm-compressor"


def prune_ignore(model: Any, ignore: list[str]) -> list[str]:
    """What the pruners leave alone: the caller's patterns plus the output embedding (the LM head),
    which prune.magnitude never touches either. llm-compressor 0.14 would prune it by default."""
    head = model.module.get_output_embeddings() if hasattr(model.module, "get_output_embeddings") else None
    # A regex: llm-compressor 0.14 matches a target layer under the name "<layer>." (a trailing
    # dot), so the plain name would not match.
    names = [f"re:{re.escape(n)}\\.?$" for n, mod in model.module.named_modules() if head is not None and mod is head]
    return list(dict.fromkeys([*ignore, *names]))


def linear_zeros(model: Any) -> dict[str, int]:
    """Exact zeros in every ``nn.Linear`` weight, by module name (taken before and after a pruner to
    see which layers it pruned)."""
    from torch import nn

    return {
        name: int((mod.weight.data == 0).sum())
        for name, mod in model.module.named_modules()
        if isinstance(mod, nn.Linear)
    }


def record_sparsity(
    model: Any, method: str, sparsity: float, mask: str | None, before: dict[str, int]
) -> dict[str, Any]:
    """Pruned weights stay dense (llm-compressor 0.14 no longer writes sparse-compressed
    checkpoints); the structure goes into config.json as ``sparsity_config`` (the shape of the
    compressed-tensors field, with ``format: dense``), where N:M-aware runtimes and people read it.
    The pruned layers are those whose zeros grew: llm-compressor's own choice (the Linear layers
    of the decoder/encoder blocks; never embeddings or heads)."""
    mods = dict(model.module.named_modules())
    after = linear_zeros(model)
    targets = sorted(n for n, z in after.items() if z > before.get(n, 0))
    total = zeros = 0
    nm_ok = True
    for name in targets:
        w = mods[name].weight.data
        total += w.numel()
        zeros += after[name]
        if mask is not None:
            n, m = (int(x) for x in mask.split(":"))
            # N:M groups run along the input dimension: M consecutive weights of one output row.
            nm_ok = nm_ok and w.shape[-1] % m == 0 and bool(((w.reshape(-1, m) == 0).sum(1) >= n).all())
    if not targets:
        raise ValueError(f"{method} pruned no layer of this model (llm-compressor found no Linear layer in its blocks)")
    achieved = zeros / total
    model.config_extra["sparsity_config"] = {
        "format": "dense",
        "sparsity_structure": mask or "unstructured",
        "global_sparsity": round(achieved, 6),
        "targets": targets,
        "method": method,
    }
    model.notes["sparsity_structure"] = mask or "unstructured"
    return {
        "achieved_sparsity": round(achieved, 6),
        "requested_sparsity": sparsity,
        "mask": mask,
        "mask_holds": nm_ok if mask else None,
        "pruned_layers": len(targets),
    }
