"""The methods that run through llm-compressor (Wanda, SparseGPT, GPTQ, SmoothQuant, AWQ) share
this: submit-time checks, the calibration set, the ``oneshot`` call and the saver.

Why llm-compressor: it is where these algorithms are maintained (vLLM project), it runs them
layer by layer (its ``sequential`` pipeline traces the model into one subgraph per decoder layer
and calibrates them one after the other, so only one layer's activations are alive at a time), and
it writes compressed-tensors checkpoints that transformers and vLLM load. We add the service parts:
refusals at submit with a reason, calibration from the job's dataset, progress and metrics.

Module-level imports are stdlib only: the API imports the checks through the method registry.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from worker.ct_format import CONV1D_MODEL_TYPES
from worker.methods import ModelInfo, StrictParams, has_tokenizer


class CalibrationParams(StrictParams):
    """Calibration data every llm-compressor method takes from the job's ``dataset_id``."""

    num_samples: int = Field(default=128, ge=1, le=4096, description="calibration texts used (the first N of the dataset)")
    max_length: int = Field(default=512, ge=8, le=131_072, description="tokens per calibration text (longer texts are cut)")


class PruneParams(CalibrationParams):
    """``sparsity`` (unstructured, per layer) or ``mask`` (N:M: N zeros in every M consecutive
    weights of a row, which sparse tensor cores run at up to 2x)."""

    sparsity: float | None = Field(default=None, gt=0, lt=1, description="fraction of each pruned layer's weights set to zero")
    mask: Literal["2:4", "4:8"] | None = Field(default=None, description="N:M semi-structured sparsity (50%)")
    ignore: list[str] = Field(default_factory=list, max_length=64,
                              description="more modules to leave dense: names, or 're:<regex>' patterns (the LM head always is)")

    @model_validator(mode="after")
    def _one_of(self) -> "PruneParams":
        if self.sparsity is None and self.mask is None:
            raise ValueError("give 'sparsity' or 'mask'")
        if self.mask is not None and self.sparsity is not None and abs(self.sparsity - nm_sparsity(self.mask)) > 1e-9:
            raise ValueError(f"mask {self.mask} means sparsity {nm_sparsity(self.mask)}; leave 'sparsity' out")
        return self

    @property
    def target_sparsity(self) -> float:
        return nm_sparsity(self.mask) if self.mask else float(self.sparsity)  # type: ignore[arg-type]


# Weight (and activation) formats of the integer schemes, as compressed-tensors QuantizationArgs.
SCHEMES: dict[str, dict[str, Any]] = {
    "W4A16": {"weights": {"num_bits": 4, "type": "int", "symmetric": True}, "input_activations": None},
    "W8A16": {"weights": {"num_bits": 8, "type": "int", "symmetric": True}, "input_activations": None},
    # Activations: int8, per token, quantized at run time (as quantize.dynamic_int8).
    "W8A8": {"weights": {"num_bits": 8, "type": "int", "symmetric": True},
             "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}},
}
DEFAULT_GROUP = {"W4A16": 128, "W8A16": None, "W8A8": None}


def config_groups(scheme: str, group_size: int | None) -> dict[str, Any]:
    """One compressed-tensors scheme for every targeted Linear: ``group_size`` null is one scale
    per output channel."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = SCHEMES[scheme]
    weights = {**spec["weights"], **({"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"})}
    acts = spec["input_activations"]
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                                          input_activations=QuantizationArgs(**acts) if acts else None)}


class QuantizeParams(CalibrationParams):
    """The integer scheme of a calibrated quantizer."""

    group_size: int | None = Field(default=None, description="input columns sharing a scale: 32, 64 or 128; null: per "
                                   "channel. Omitted: 128 for W4A16, per channel for W8A16 and W8A8")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], max_length=64,
                              description="modules left in float: names, or 're:<regex>' patterns (the LM head by default)")

    @model_validator(mode="after")
    def _group(self) -> "QuantizeParams":
        if self.group_size is not None and self.group_size not in (32, 64, 128):
            raise ValueError("group_size must be 32, 64, 128 or null")
        return self

    def effective_group(self, scheme: str) -> int | None:
        g = self.group_size if "group_size" in self.model_fields_set else DEFAULT_GROUP[scheme]
        if scheme == "W8A8" and g is not None:
            raise ValueError("W8A8 quantizes weights per channel: leave group_size out (or null)")
        return g


def check_model(method: str, info: ModelInfo, *, quantizes: bool) -> None:
    """Submit-time refusals shared by the llm-compressor methods (ValueError -> 422)."""
    config = info.config or {}
    if not has_tokenizer(info.files):
        raise ValueError(f"{method} calibrates on the job's dataset tokenized with the model's own tokenizer: upload "
                         "tokenizer.json (or vocab.txt, or vocab.json + merges.txt) with the model")
    if config.get("model_type") in CONV1D_MODEL_TYPES:
        raise ValueError(
            f"{method} runs through llm-compressor, which prunes and quantizes torch.nn.Linear layers only; "
            f"{info.architecture or 'this model'} (model_type {config.get('model_type')!r}) keeps its attention and MLP "
            "weights in transformers' Conv1D layers, so nothing would be compressed. Use prune.magnitude or quantize.cast")
    if quantizes and "quantization_config" in config:
        raise ValueError(f"{method}: the model is already quantized; upload the unquantized model")


def check_group(method: str, info: ModelInfo, group_size: int | None) -> None:
    from worker.ct_format import check_model as ct_check

    ct_check(method, info, group_size)


def nm_sparsity(mask: str) -> float:
    """``"2:4"`` -> 0.5: N of every M consecutive weights are zero (llm-compressor's reading)."""
    n, m = (int(x) for x in mask.split(":"))
    return n / m




# --- worker side ----------------------------------------------------------------------------------


def calibration_dataset(model: Any, ctx: Any, params: CalibrationParams) -> tuple[Any, dict[str, Any]]:
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
    info = {"calibration_samples": len(rows), "calibration_tokens": sum(len(enc["input_ids"][i]) for i in rows),
            "max_length": max_len}
    if not rows:
        raise ValueError("the dataset has no text to calibrate on")
    return Dataset.from_dict(columns), info


def run_oneshot(model: Any, ctx: Any, recipe: list[Any], params: CalibrationParams) -> dict[str, Any]:
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
        with spill_activations(scratch, budget) as spill:
            _oneshot(model, dataset, recipe, info)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the files were unlinked when mapped: the folder
    model.module.eval()
    return {**info, "pipeline": "sequential", "oneshot_seconds": round(time.perf_counter() - t0, 4),
            "device": str(next(model.module.parameters()).device),
            "torch_threads": torch.get_num_threads(), **spill.summary()}


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

    return {name: int((mod.weight.data == 0).sum()) for name, mod in model.module.named_modules() if isinstance(mod, nn.Linear)}


def record_sparsity(model: Any, method: str, sparsity: float, mask: str | None, before: dict[str, int]) -> dict[str, Any]:
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
    return {"achieved_sparsity": round(achieved, 6), "requested_sparsity": sparsity, "mask": mask,
            "mask_holds": nm_ok if mask else None, "pruned_layers": len(targets)}
