"""The plan of a job, computed before it runs: peak memory, scratch disk, artifact bytes, seconds.

Nothing here reads a weight or imports torch (the API computes plans): the inputs are the
tensors' dtypes and shapes from the safetensors headers of the stored model files (8-byte
little-endian length + JSON, read through the Storage interface: the file, or a range read of
an object store), the job's steps and evaluation, and the fleet's measured throughput.

Three paths (``path``):

* ``stream``: every step's method has a streaming form (``MethodSpec.streams``): tensors are read
  one at a time from the memory-mapped shards and written once into the artifact. Peak memory is
  the worker's baseline plus the method's factor (``STREAM_FACTORS``) times the largest tensor in
  float32 (at most one row chunk, ``STREAM_CHUNK_BYTES``).
* ``blocks``: every step runs through llm-compressor's sequential pipeline (``MethodSpec.blocks``)
  on the model with its weights left on disk, one decoder block onloaded at a time. Its memory is
  planned with the in-memory factors below (``WHOLE_FACTORS``): measured for GPTQ on a 360 MB
  Llama, the block path's peak was 1.14x the model above the baseline against 2.15x in memory, so
  the whole-path factor is an upper bound until the block path's own factors are measured.
* ``whole``: the model is loaded whole (``from_pretrained`` with the stored dtypes) and every step
  works on it. Peak memory is the baseline plus the model's bytes times the largest factor of its
  methods (``WHOLE_FACTORS``; distillation counts the student and its optimizer state).

Evaluation (``evaluation.enabled``) is planned as it will run (``evaluation_mode``):

* ``whole``: the original and the compressed model are loaded one after the other: its peak is the
  baseline plus ``EVAL_MAPPED_FACTOR`` (float results, memory-mapped) or
  ``EVAL_DECOMPRESSED_FACTOR`` (integer results, decompressed on load) times the model's bytes;
* ``streamed``: on the stream and blocks paths, a model the worker cannot hold whole twice
  (``EVAL_WHOLE_HOLD`` x its bytes over the memory budget, less the baseline: the worker's own
  test, worker/pipeline._fits_twice) is evaluated with both models' weights on disk, one module
  onloaded at a time: the baseline plus ``EVAL_STREAMED_FACTOR`` x the largest tensor as stored
  and one text's logits of both models; its scratch counts the artifact decompressed to float;
* ``skipped``: a bare state dict has no architecture to run: nothing is loaded, no peak.

The plan's peak is the larger of the evaluation's and the steps' peak.

Memory is anonymous memory (what an OOM kill counts): weight files are memory-mapped, and their
pages are the kernel's to drop.

Every figure is an estimate with its inputs in the plan (``model_bytes``, ``largest_tensor_bytes``,
``baseline_bytes``, ``memory_factor``, ``throughput_bytes_per_s``) and what it assumed in
``notes``. The constants below say where their values come from.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

# safetensors dtype -> bytes per element (app.models.validation.SAFETENSORS_DTYPES, which refuses others).
from core.methods._ct import fallback_group
from core.models.validation import SAFETENSORS_DTYPES

# Memory is anonymous memory (RssAnon: what the job allocates, what an OOM kill counts; the pages
# of memory-mapped weight files are the kernel's to drop and are not counted), as the worker
# samples it per job (metrics.memory.peak_anon_bytes, worker/memory.py). The factors below were
# measured on the CI machine (x86-64, 2 cores, torch 2.13 CPU) with real jobs, each on a fresh
# worker, evaluation off, as peak_anon_bytes minus the peak of a tiny job run first on the same
# worker; MODELPRESS_TEST_PLAN_CALIBRATE=1 pytest tests/test_plan.py -k measured -s measures them
# again.

# A worker pool process with torch and transformers imported, running a tiny job (75 KB of
# weights): 420 MiB of anonymous memory, the same on every fresh worker measured.
BASELINE_BYTES = 440 * 10**6

# stream path: peak above the baseline = the method's factor x the largest tensor in float32, or
# x one row chunk when the tensor is larger (worker/stream works through a tensor in row chunks of
# STREAM_CHUNK_BYTES of float32: keep in step with worker/stream CHUNK_BYTES). Measured through a
# worker (tests/test_plan.py) on a 135 MB float32 Llama whose largest tensors are 16 MiB (hidden
# 1024, MLP 4096), with the per-core kernels, the writer thread (16 MiB queued at most) and
# glibc's mmap threshold fixed (worker/memory.return_freed_memory): magnitude pruning 61 MiB above
# the baseline (3.8x: its output chunk, the one queued, the one being written), int4 weight-only
# 21 MiB (1.3x: the packed output is 1/8 of the float32 input). Dynamic int8 and fixed point run
# the same kernel with a larger output (int8): not measured apart, 1.6x. Cast: 27 MiB (1.7x),
# measured before those changes (an upper bound).
STREAM_FACTORS: dict[str, float] = {
    "prune.magnitude": 3.8,
    "quantize.cast": 1.8,
    "quantize.weight_only": 1.3,
    "quantize.dynamic_int8": 1.6,
    "quantize.fixed_point": 1.6,
    # quantize.fp8 / quantize.fp4 quantize each weight whole (FP8_BLOCK's blocks and NVFP4's
    # global scale span rows; worker/stream/fp.py): the factor applies to the largest quantized
    # weight, not to a row chunk (WHOLE_TENSOR_STREAM). Measured on one 8192 x 4096 bf16 weight
    # (ru_maxrss growth over its float32 size: llm-compressor's observers, the compressed
    # outputs, the error measurement): FP8_DYNAMIC 3.9x, FP8_BLOCK 3.9x, MXFP4A16 4.1x, NVFP4A16 5.5x.
    "quantize.fp8": 4.0,
    "quantize.fp4": 5.5,
}
WHOLE_TENSOR_STREAM = frozenset({"quantize.fp8", "quantize.fp4"})
# Schemes of the streaming methods that calibrate on data, so the job runs in memory
# (core/methods/quantize_fp8.py and quantize_fp4.py DATA_FREE: tests/test_fp_quant.py compares).
CALIBRATED_SCHEMES: dict[str, frozenset[str]] = {
    "quantize.fp8": frozenset({"FP8"}),
    "quantize.fp4": frozenset({"NVFP4"}),
}
DEFAULT_SCHEME = {"quantize.fp8": "FP8_DYNAMIC", "quantize.fp4": "NVFP4A16"}
# A streaming method not measured yet: the engine's design figure (the chunk read, its float32
# working copy, the transformed result, the output buffer).
STREAM_TENSOR_FACTOR = 4.0
STREAM_CHUNK_BYTES = 32 << 20

# whole path: peak above the baseline = factor x the model's bytes as stored, by method. The model
# is loaded through memory maps (no anonymous memory until a method writes to it). Measured on a
# 78 MB Llama (6 layers, hidden 512): wanda 71-128 MiB above the baseline in five runs (1.0-1.7x:
# 72 and 71 MiB on commit 2df2418, 118, 128 and 120 on the working tree a few commits before,
# the same resident peak each time; 1.25 is within 30 % of both), GPTQ 190 MiB (2.56x),
# SmoothQuant 170 MiB (2.29x), structured pruning 29 MiB (0.39x). The data-free methods
# take this path only when the model cannot stream (or MODELPRESS_STREAM_ENGINE is false): their
# factors are resident-memory growths measured before anonymous memory was sampled (an upper bound).
WHOLE_FACTORS: dict[str, float] = {
    # On the block path with glibc's mmap threshold fixed (freed blocks go back to the system):
    # 55 MiB for the 74 MB Llama (0.74x; 68-128 MiB before, the heap keeping what was freed).
    "prune.wanda": 0.8,
    "prune.sparsegpt": 1.6,  # wanda's machinery (llm-compressor) and its Hessians, not measured apart
    "quantize.gptq": 2.6,
    "quantize.awq": 2.6,  # gptq's figure: 1206 MB peak for both on a 2-layer Gemma (358 MB file)
    "quantize.autoround": 2.6,  # 1215 MB on the same model (+ its captured layer inputs at long texts)
    "quantize.smoothquant": 2.3,
    "prune.structured": 0.4,
    "prune.magnitude": 1.2,
    "quantize.cast": 1.2,
    "quantize.weight_only": 2.2,
    "quantize.fixed_point": 2.2,
    "quantize.dynamic_int8": 2.2,
    # Not measured: llm-compressor's oneshot over the whole model, as GPTQ's (an upper bound for
    # the data-free schemes, which only observe the weights).
    "quantize.fp8": 2.6,
    "quantize.fp4": 2.6,
}
# A method not listed above (a new one): the largest measured factor.
DEFAULT_WHOLE_FACTOR = 2.6

# blocks path (llm-compressor's sequential pipeline over a model whose weights stay on disk):
# peak above the baseline = BLOCK_FACTOR x (the largest decoder block in float32 + the method's
# per-Linear state for that block) + the largest tensor outside the blocks as stored (the
# embedding, onloaded to compute the first block's inputs) + the carried calibration activations
# (inputs and outputs of a block, capped by MODELPRESS_ACTIVATION_MEMORY_MB: the rest is spilled
# to scratch, worker/spill.py) + BLOCK_FIXED_BYTES (the offload and tracing machinery). The
# per-Linear state of GPTQ and SparseGPT is a float32 Hessian of in_features^2; Wanda's and
# SmoothQuant's are vectors (nothing). Fitted on three jobs through a worker: GPTQ W4A16 on a
# 2.01 GB bf16 Llama (hidden 2048 x 17 blocks, FFN 5632, 16 x 128 tokens): 0.77 GiB above the
# baseline, this formula 0.89; GPTQ on 0.50 GiB (hidden 1024 x 16, 16 x 256 tokens): 0.28 GiB,
# formula 0.29; Wanda on the 74 MB float32 Llama of tests/test_plan.py: 55 MiB, formula 65.
BLOCK_FACTOR = 1.8
BLOCK_FIXED_BYTES = 40 << 20
HESSIAN_METHODS = frozenset({"quantize.gptq", "prune.sparsegpt"})
ACTIVATION_MEMORY_BYTES = 1024 << 20  # app.config Settings.activation_memory_mb's default
# distill: the student four times over (weights, gradients, AdamW's two moments) plus activations
# and logits (DISTILL_ACTIVATION_FACTOR x the teacher); the frozen teacher stays memory-mapped.
# Measured: 3 of 6 layers of the 78 MB Llama, batch 4 x 32 tokens: 192 MiB (2.59x the teacher).
DISTILL_STUDENT_COPIES = 4.0
DISTILL_ACTIVATION_FACTOR = 0.6
# Evaluation loads the original, then the compressed model whole and runs them: above the
# baseline, this x the model's bytes. Float results load through memory maps (activations and the
# evaluator's copies only: 31-44 MiB in four runs for the 135 MB Llama pruned, 0.24-0.34x);
# integer results are decompressed into float weights on load (223 MiB for it in int4, 1.73x).
EVAL_MAPPED_FACTOR = 0.28
EVAL_DECOMPRESSED_FACTOR = 1.8
# The worker evaluates whole when this x the model's bytes fits its memory (worker/pipeline.py
# _fits_twice: loaded weights, activations and the evaluator's copies, measured ~2.5x).
EVAL_WHOLE_HOLD = 3
# Streamed evaluation (weights on disk): one module of each model onloaded at a time, so the
# peak follows the largest tensor as stored. Measured on Gemma 3 270M (bf16; its tied 262,144 x
# 640 embedding, 335 MB, is the largest): 506 MiB of anonymous memory above the process's
# baseline for the evaluation with both models on disk (826 MiB in memory), 1.58x that tensor;
# its texts were ~20 tokens, so the logits term below (one text of seq_len tokens, both models,
# the metric math's temporaries: a design figure) was not what that peak measured.
EVAL_STREAMED_FACTOR = 1.6
EVAL_LOGITS_COPIES = 6

# Throughput in "work bytes" per second before a worker measured its own (workers record theirs
# after every job on a model of at least MIN_THROUGHPUT_SAMPLE_BYTES, worker/budget.py): model
# bytes x the method's cost weight per second, after FIXED_SECONDS of set-up. Measured on the CI
# machine (2 shared cores): a 78 MB Llama pruned by magnitude in memory in 7.8 s (load, step,
# save, zip, store: ~10 MB/s); a 2.2 GB bf16 Llama streamed through a worker with other test
# suites on the cores (load average ~5): 4-bit in 16.8 s, global magnitude 50 % in 15.4 s
# (~130-140 MB/s; bench/bench_stream.py, docs/BENCHMARKS.md).
DEFAULT_THROUGHPUT_BYTES_PER_S = {"whole": 10 * 10**6, "stream": 120 * 10**6, "blocks": 10 * 10**6}
FIXED_SECONDS = 0.5
MIN_THROUGHPUT_SAMPLE_BYTES = 32 << 20
# Relative cost of a method per model byte, against magnitude pruning on the same path (1.0),
# from the seconds of the calibration jobs above (rough: the CI machine's 2 cores are shared, and
# the calibrated methods' times varied 3-20x between runs). A method not listed costs 1.
WHOLE_COST: dict[str, float] = {
    "prune.wanda": 3.0,
    "prune.sparsegpt": 10.0,
    "quantize.gptq": 8.0,
    "quantize.smoothquant": 6.0,
    # On CPU workers (issue 22): 1.34x GPTQ at 16 x 512 calibration tokens on a cut-down Gemma 3
    # (0.75-0.82x at 16 x 128: its 20-point scale search grows with the tokens).
    "quantize.awq": 11.0,
    "prune.structured": 0.5,
}
STREAM_COST: dict[str, float] = {
    "quantize.cast": 0.3,
    "quantize.weight_only": 1.1,
    "quantize.dynamic_int8": 1.0,
    "quantize.fixed_point": 1.3,
}
# FP8 static / NVFP4: llm-compressor's sequential calibration with observers only (no Hessian):
# SmoothQuant's figure, not measured apart.
CALIBRATED_FP_COST = 6.0
# distill: per optimizer step of the reference batch (4 x 32 tokens), on top of 1 (load, save);
# 5 steps of 3 of 6 layers of the 78 MB Llama took ~3x a magnitude pruning of it.
DISTILL_COST_PER_STEP = 0.5
DISTILL_DEFAULT_STEPS = 100


AUTOROUND_DEFAULT_ITERS = 200  # core/methods/quantize_autoround.py's defaults
AUTOROUND_DEFAULT_LENGTH = 512


def method_cost(method: str, params: Mapping[str, Any], path: str) -> float:
    """A step's cost weight: seconds = FIXED_SECONDS + model bytes x cost / throughput."""
    if method == "distill":
        steps = params.get("steps") or (
            DISTILL_DEFAULT_STEPS if not params.get("epochs") else 10 * int(params["epochs"])
        )
        tokens = int(params.get("batch_size", 8)) * int(params.get("max_length", 128))
        return 1.0 + DISTILL_COST_PER_STEP * steps * tokens / (4 * 32)
    if method == "quantize.autoround":
        # Set-up ~0.4x GPTQ, then each tuning step ~0.035x GPTQ at 128 tokens a text, measured on a
        # 2-layer Gemma 3 on 2 CPU cores: at the defaults (200 steps, 512 tokens) ~28x GPTQ.
        iters = int(params.get("iters") or AUTOROUND_DEFAULT_ITERS)
        length = int(params.get("max_length") or AUTOROUND_DEFAULT_LENGTH)
        return WHOLE_COST["quantize.gptq"] * (0.4 + 0.035 * iters * length / 128)
    if path != "stream" and _scheme(method, params) in CALIBRATED_SCHEMES.get(method, ()):
        return CALIBRATED_FP_COST  # calibration through llm-compressor's sequential pipeline
    return (STREAM_COST if path == "stream" else WHOLE_COST).get(method, 1.0)


def _scheme(method: str, params: Mapping[str, Any]) -> str:
    return str(params.get("scheme") or DEFAULT_SCHEME.get(method, ""))


def job_cost(steps: Iterable[Mapping[str, Any]], path: str) -> float:
    """The job's cost weight: its steps' (a stream pass fuses them: the dearest)."""
    costs = [method_cost(s["method"], s.get("params") or {}, path) for s in steps]
    if not costs:
        return 1.0
    return max(costs) if path == "stream" else sum(costs)


# Zip headers and the manifest (modelpress.json) of an artifact directory.
ZIP_OVERHEAD_BYTES = 8 << 10
# Seconds of evaluation beyond its budget_s (loading the compressed model, tokenizing).
EVAL_OVERHEAD_S = 2.0

# Names of bare-state-dict tensors that are embeddings or heads (worker/model_io.py's list): no
# method changes them. Quantizers also leave the LM head alone (their default ``ignore``).
_EMBEDDING_PATTERNS = ("*embed*", "*wte*", "*wpe*", "*lm_head*", "*shared.weight", "*position*")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LAYER_RE = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)\.")


class HeaderError(ValueError):
    """A stored file's safetensors header cannot be read (it was validated at upload)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPES.get(self.dtype, 4)

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES


def read_header(f: BinaryIO, max_bytes: int) -> list[Tensor]:
    """The tensors of one safetensors file, from its header only (a few KB of a multi-GB file)."""
    head = f.read(8)
    if len(head) != 8:
        raise HeaderError("file too short")
    (n,) = struct.unpack("<Q", head)
    if not 0 < n <= max_bytes:
        raise HeaderError(f"header size {n} outside 1..{max_bytes}")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"header is not JSON ({e.__class__.__name__})") from None
    header.pop("__metadata__", None)
    return [Tensor(name, info["dtype"], tuple(info["shape"])) for name, info in header.items()]


def is_target(t: Tensor) -> bool:
    """A weight methods act on: a 2-D float ``*.weight`` that is not an embedding or head."""
    return (
        len(t.shape) == 2
        and t.is_float
        and t.name.endswith(".weight")
        and not any(fnmatch.fnmatch(t.name, p) for p in _EMBEDDING_PATTERNS)
    )


def blocks_capable(fmt: str, steps: Iterable[Mapping[str, Any]], registry: Mapping[str, Any]) -> bool:
    """Whether every step runs block by block (``MethodSpec.blocks``; HF models only)."""
    specs = [registry.get(s["method"]) for s in steps]
    return fmt == "hf" and bool(specs) and all(spec is not None and spec.blocks for spec in specs)


def _blocks_above_baseline(tensors: list[Tensor], steps: list[Mapping[str, Any]], activation_cap: int) -> int:
    """The block path's peak above the baseline (see ``BLOCK_FACTOR``)."""
    by_layer: dict[int, list[Tensor]] = {}
    outside: list[Tensor] = []
    for t in tensors:
        m = _LAYER_RE.search(t.name)
        (by_layer.setdefault(int(m.group(1)), []) if m else outside).append(t)
    hessian = any(s["method"] in HESSIAN_METHODS for s in steps)
    block = 0
    for ts in by_layer.values():
        f32 = sum(t.numel * 4 for t in ts)
        state = (
            sum(t.shape[1] ** 2 * 4 for t in ts if hessian and len(t.shape) == 2 and t.name.endswith(".weight"))
            if hessian
            else 0
        )
        block = max(block, f32 + state)
    largest_outside = max((t.nbytes for t in outside), default=0)
    hidden = max(
        (
            t.shape[1]
            for t in tensors
            if len(t.shape) == 2 and any(fnmatch.fnmatch(t.name, p) for p in _EMBEDDING_PATTERNS)
        ),
        default=0,
    )
    itemsize = max((t.nbytes // max(t.numel, 1) for t in tensors if t.is_float), default=4)
    acts = 0
    for s in steps:
        p = s.get("params") or {}
        tokens = int(p.get("num_samples", 128)) * int(p.get("max_length", 512))
        acts = max(acts, 2 * tokens * hidden * itemsize)  # a block's inputs and its outputs
    return int(BLOCK_FACTOR * block) + largest_outside + min(acts, activation_cap) + BLOCK_FIXED_BYTES


def stream_capable(steps: Iterable[Mapping[str, Any]], registry: Mapping[str, Any]) -> bool:
    """Whether every step's method has a streaming form (``MethodSpec.streams``). No step (a job
    that only exports) streams too: its tensors are copied through, as the worker does."""
    steps = list(steps)
    specs = [registry.get(s["method"]) for s in steps]
    # quantize.fp8 / quantize.fp4 stream their data-free schemes only (the worker's stream form
    # raises NotStreamable for the others and runs them in memory).
    calibrated = any(
        _scheme(s["method"], s.get("params") or {}) in CALIBRATED_SCHEMES.get(s["method"], ()) for s in steps
    )
    return not calibrated and all(spec is not None and spec.streams for spec in specs)


# --- artifact bytes, tensor by tensor ----------------------------------------------------------


@dataclass
class _Out:
    """One tensor of the result and its stored bytes."""

    tensor: Tensor
    nbytes: int
    quantized: bool = False
    dropped: bool = False


def _pack_bytes(out_f: int, in_f: int, bits: int, group: int | None, scale_size: int, symmetric: bool) -> int:
    """compressed-tensors pack-quantized: int32 words + scales (+ packed zero points) + shape."""
    groups = math.ceil(in_f / group) if group else 1
    stored = out_f * math.ceil(in_f * bits / 32) * 4 + 16 + out_f * groups * scale_size
    if not symmetric:
        stored += math.ceil(out_f * bits / 32) * groups * 4
    return stored


# The floating-point formats (compressed-tensors float-quantized, nvfp4/mxfp4-pack-quantized), as
# the worker writes them (tests/test_fp_quant.py compares with artifacts): input columns per scale.
FP_FORMATS = frozenset({"quantize.fp8", "quantize.fp4"})
FP_GROUPS = {"NVFP4A16": 16, "NVFP4": 16, "MXFP4A16": 32, "MXFP4": 32}
FP8_BLOCK = 128


def _fp_bytes(scheme: str, out_f: int, in_f: int, scale_size: int) -> int:
    """Stored bytes of one weight in an FP8/FP4 scheme: FP8 one byte a weight plus scales in the
    weight's dtype (per channel, per 128x128 block, or one, with FP8's static input scale); FP4 two
    weights a byte, a one-byte scale per group (fp8 e4m3 for NVFP4, e8m0 for MXFP4), and NVFP4's
    float32 global scale (and, for NVFP4 with activations, theirs)."""
    if scheme in FP_GROUPS:
        stored = out_f * math.ceil(in_f / 2) + out_f * math.ceil(in_f / FP_GROUPS[scheme])
        if scheme.startswith("NVFP4"):
            stored += 4 + (4 if scheme == "NVFP4" else 0)
        return stored
    if scheme == "FP8_BLOCK":
        return out_f * in_f + math.ceil(out_f / FP8_BLOCK) * math.ceil(in_f / FP8_BLOCK) * scale_size
    if scheme == "FP8":
        return out_f * in_f + 2 * scale_size
    return out_f * in_f + out_f * scale_size  # FP8_DYNAMIC: per output channel


def _int8_bytes(out_f: int, in_f: int, scale_size: int) -> int:
    """compressed-tensors int-quantized (W8A8): int8 weights + one scale per output channel."""
    return out_f * in_f + out_f * scale_size


def _quant_scheme(method: str, params: Mapping[str, Any]) -> tuple[str, int, int | None, bool] | None:
    """(format, bits, group, symmetric) of a quantizing step, None for others."""
    if method == "quantize.weight_only":
        return "pack", int(params.get("bits", 8)), params.get("group_size"), bool(params.get("symmetric", True))
    if method == "quantize.fixed_point":
        return "pack", int(params.get("bits", 8)), None, True
    if method == "quantize.dynamic_int8" or method == "quantize.smoothquant":
        return "int8", 8, None, True
    if method in FP_FORMATS:
        scheme = _scheme(method, params)
        return "fp", 8 if method == "quantize.fp8" else 4, FP_GROUPS.get(scheme), True
    if method in ("quantize.gptq", "quantize.awq", "quantize.autoround"):
        scheme = params.get("scheme", "W4A16")
        if scheme == "W8A8":
            return "int8", 8, None, True
        # Scale bytes only: per group of 128 or per channel differ by ~3 % of a 4-bit weight.
        group = params.get("group_size") or (128 if scheme == "W4A16" else None)
        return "pack", 4 if scheme == "W4A16" else 8, group, True
    return None


def quantizes(steps: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a step stores integer weights (compressed-tensors: the result loads decompressed)."""
    return any(_quant_scheme(s["method"], s.get("params") or {}) is not None for s in steps)


def _ignored(name: str, params: Mapping[str, Any]) -> bool:
    module = name.removesuffix(".weight")
    for pat in params.get("ignore") or []:
        if isinstance(pat, str) and (
            pat == module
            or module.endswith("." + pat)
            or pat == module.rsplit(".", 1)[-1]
            or (pat.startswith("re:") and re.search(pat[3:], module))
        ):
            return True
    return False


def _apply_step(outs: list[_Out], method: str, params: Mapping[str, Any], notes: list[str], layers: int | None) -> None:
    """The bytes each tensor has after ``method`` (in place on ``outs``)."""
    if method == "quantize.cast":
        for o in outs:
            if o.tensor.dtype in ("F32", "F64") and not o.quantized:
                o.nbytes = o.tensor.numel * 2
    elif method in ("prune.magnitude", "prune.wanda", "prune.sparsegpt"):
        pass  # zeros are stored densely
    elif method == "prune.structured":
        _apply_structured(outs, params, notes)
    elif method == "distill":
        _apply_distill(outs, params, notes, layers)
    elif method == "transform.rotate":
        _apply_rotate(outs, params, notes)
    else:
        _apply_quantize(outs, method, params, notes)


def _apply_rotate(outs: list[_Out], params: Mapping[str, Any], notes: list[str]) -> None:
    """What a rotation adds to the artifact (worker/methods/transform_rotate.py): ``spinquant``
    unties a tied embedding (the head becomes a tensor of its own, stored as it is), ``quip``
    stores one Hadamard matrix per rotated input width (or one of ``block_size``), in the model's
    dtype (worker/model_io.py). The rotated weights keep their shapes."""
    embed = next((o.tensor for o in outs if o.tensor.name.endswith("embed_tokens.weight")), None)
    if params.get("style") == "spinquant":
        if embed is not None and not any(o.tensor.name.endswith("lm_head.weight") for o in outs):
            outs.append(_Out(Tensor("lm_head.weight", embed.dtype, embed.shape), embed.nbytes))
            notes.append("transform.rotate spinquant: the tied embedding is untied, the head stored as it is")
        return
    targets = [o.tensor for o in outs if is_target(o.tensor) and not _ignored(o.tensor.name, params)]
    block = params.get("block_size")
    widths = {int(block)} if block else {t.shape[1] for t in targets}
    dtype = embed.dtype if embed is not None else targets[0].dtype if targets else "F32"
    for w in sorted(widths):
        # Marked quantized: no later step changes their bytes.
        outs.append(_Out(Tensor(f"<hadamard {w}>", dtype, (w, w)), w * w * SAFETENSORS_DTYPES.get(dtype, 4), True))


def _apply_structured(outs: list[_Out], params: Mapping[str, Any], notes: list[str]) -> None:
    ffn, heads = float(params.get("ffn", 0.0)), float(params.get("heads", 0.0))
    # Feed-forward weights lose ``ffn`` of their rows or columns, attention projections ``heads``.
    for o in outs:
        if not is_target(o.tensor):
            continue
        name = o.tensor.name
        if any(k in name for k in ("mlp", "intermediate", "ffn", "fc", "output.dense")) and "attention" not in name:
            o.nbytes = int(o.nbytes * (1 - ffn))
        elif any(k in name for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
            o.nbytes = int(o.nbytes * (1 - heads))
    notes.append("prune.structured: removed rows and columns estimated by tensor name (mlp/attention)")


def _apply_distill(outs: list[_Out], params: Mapping[str, Any], notes: list[str], layers: int | None) -> None:
    keep = params.get("layers")
    if keep and layers:
        for o in outs:
            m = _LAYER_RE.search(o.tensor.name)
            if m and int(m.group(1)) >= int(keep):  # a count of layers stays; which ones does not matter to bytes
                o.dropped = True
    else:
        notes.append("distill: the student's size is counted as the teacher's (an upper bound)")


def _apply_quantize(outs: list[_Out], method: str, params: Mapping[str, Any], notes: list[str]) -> None:
    """A weight quantization method; any other method's output is counted at the input's size."""
    scheme = _quant_scheme(method, params)
    if scheme is None:
        if method:
            notes.append(f"{method}: artifact counted at the input's size")
        return
    fmt, bits, group, symmetric = scheme
    for o in outs:
        t = o.tensor
        if not is_target(t) or o.quantized or _ignored(t.name, params):
            continue
        out_f, in_f = t.shape
        scale_size = SAFETENSORS_DTYPES.get(t.dtype, 4) if o.nbytes == t.nbytes else 2
        if fmt == "fp":
            o.nbytes = _fp_bytes(_scheme(method, params), out_f, in_f, scale_size)
        elif fmt == "pack":
            # A group size that does not divide this layer's width: the layer gets the one the
            # worker gives it (the largest accepted size that divides it, or per channel).
            layer_group = fallback_group(int(group), in_f) if group else None
            o.nbytes = _pack_bytes(out_f, in_f, bits, layer_group, scale_size, symmetric)
        else:
            o.nbytes = _int8_bytes(out_f, in_f, scale_size)
        o.quantized = True


def _layer_count(tensors: Iterable[Tensor]) -> int | None:
    found = {int(m.group(1)) for t in tensors if (m := _LAYER_RE.search(t.name))}
    return max(found) + 1 if found else None


# --- the plan ----------------------------------------------------------------------------------


def _step_factor(method: str, params: Mapping[str, Any], model_bytes: int, student_fraction: float) -> float:
    if method == "distill":
        return DISTILL_STUDENT_COPIES * student_fraction + DISTILL_ACTIVATION_FACTOR
    return WHOLE_FACTORS.get(method, DEFAULT_WHOLE_FACTOR)


def _steps_peak(
    path: str,
    tensors: list[Tensor],
    steps: list[Mapping[str, Any]],
    student_fraction: float,
    activation_memory_bytes: int,
) -> tuple[float, int]:
    """The steps' memory factor and peak bytes on ``path`` (stream, blocks or whole)."""
    model_bytes = sum(t.nbytes for t in tensors)
    if path == "stream":
        largest_f32 = max((t.numel * 4 for t in tensors), default=0)
        # The quantized weights only: the embedding (often the largest tensor) is copied through.
        largest_target_f32 = max((t.numel * 4 for t in tensors if is_target(t)), default=0)
        factors = [STREAM_FACTORS.get(s["method"], STREAM_TENSOR_FACTOR) for s in steps]
        factor = max(factors, default=STREAM_TENSOR_FACTOR)
        above = max(
            (
                f * (largest_target_f32 if s["method"] in WHOLE_TENSOR_STREAM else min(largest_f32, STREAM_CHUNK_BYTES))
                for f, s in zip(factors, steps, strict=True)
            ),
            default=factor * min(largest_f32, STREAM_CHUNK_BYTES),
        )
        return factor, BASELINE_BYTES + int(above)
    if path == "blocks":
        return BLOCK_FACTOR, BASELINE_BYTES + _blocks_above_baseline(tensors, steps, activation_memory_bytes)
    factor = max(
        (_step_factor(s["method"], s.get("params") or {}, model_bytes, student_fraction) for s in steps), default=1.0
    )
    return factor, BASELINE_BYTES + int(factor * model_bytes)


def _eval_peak(mode: str, tensors: list[Tensor], outs: list[_Out], evaluation: Mapping[str, Any]) -> int:
    """The evaluation's peak bytes in ``mode`` (0 when nothing is loaded)."""
    if mode == "whole":
        model_bytes = sum(t.nbytes for t in tensors)
        float_bytes = sum(t.nbytes for t in tensors if t.is_float)
        eval_factor = EVAL_DECOMPRESSED_FACTOR if any(o.quantized for o in outs) else EVAL_MAPPED_FACTOR
        return BASELINE_BYTES + int(eval_factor * max(model_bytes, float_bytes))
    if mode == "streamed":
        vocab = max(
            (
                t.shape[0]
                for t in tensors
                if len(t.shape) == 2 and any(fnmatch.fnmatch(t.name, p) for p in _EMBEDDING_PATTERNS)
            ),
            default=0,
        )
        seq_len = int(evaluation.get("seq_len", 128))
        largest_stored = max((t.nbytes for t in tensors), default=0)
        return BASELINE_BYTES + int(EVAL_STREAMED_FACTOR * largest_stored) + EVAL_LOGITS_COPIES * seq_len * vocab * 4
    return 0


def _evaluation_notes(mode: str, path: str, memory_bytes: int | None) -> list[str]:
    if mode == "streamed":
        return [
            "evaluation: streamed (the model is too large to hold twice in the largest worker's budget): both "
            "models with their weights on disk, one module at a time; no latency is measured"
        ]
    if mode == "skipped":
        return ["evaluation: a bare state dict has no architecture to run, so nothing is loaded to measure it"]
    if mode == "whole" and path != "whole" and memory_bytes is None:
        return [
            "evaluation: planned whole (no worker budget known); a worker that cannot hold the model twice "
            "streams it with the weights on disk instead, with a smaller peak"
        ]
    return []


def _scratch_bytes(artifact: int, *, fmt: str, stream: bool, enabled: bool, mode: str, float_bytes: int) -> int:
    """Scratch disk but the input's (counted when it is downloaded): stream: the artifact written
    once (and, for the evaluation, its folder unpacked next to it); whole: the result folder and,
    for a directory, its zip."""
    if stream:
        scratch = artifact + (artifact if enabled and fmt == "hf" else 0)
    else:
        scratch = artifact + (artifact if fmt == "hf" else 0)
    if mode == "streamed":
        # The artifact's quantized layers, decompressed into its offload folder on the first pass
        # (the offload folders otherwise link to the files). An upper bound: layers left in float
        # (the embedding) are not written; Gemma 3 270M: 195 MB written, 536 MB counted.
        scratch += float_bytes
    return scratch


def compute(
    *,
    fmt: str,
    tensors: list[Tensor],
    other_bytes: int,
    input_bytes: int,
    steps: list[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
    stream: bool,
    input_on_scratch: bool,
    blocks: bool = False,
    throughput: Mapping[str, float] | None = None,
    memory_bytes: int | None = None,
    activation_memory_bytes: int = ACTIVATION_MEMORY_BYTES,
) -> dict[str, Any]:
    """The plan (a JSON object, the shape of ``app.jobs.schemas.JobPlan``).

    ``tensors``: every tensor of the model's safetensors files; ``other_bytes``: its other files
    (config, tokenizer), copied to the result; ``input_bytes``: all its files; ``stream``: every
    step streams (:func:`stream_capable`); ``input_on_scratch``: the worker downloads the input
    into its work folder (object storage) rather than hard-linking it (a local folder);
    ``throughput``: measured work bytes per second by path (the fleet's), else the defaults;
    ``memory_bytes``: the largest memory budget of the fleet's workers, when known (it decides
    whether evaluation holds the models whole or streams them, :func:`evaluation_mode`)."""
    notes: list[str] = []
    path = "stream" if stream else "blocks" if blocks else "whole"
    enabled = bool(evaluation.get("enabled", True))
    model_bytes = sum(t.nbytes for t in tensors)
    float_bytes = sum(t.nbytes for t in tensors if t.is_float)
    largest_f32 = max((t.numel * 4 for t in tensors), default=0)

    outs = [_Out(t, t.nbytes) for t in tensors]
    layers = _layer_count(tensors)
    for step in steps:
        _apply_step(outs, step["method"], step.get("params") or {}, notes, layers)
    weight_out = sum(o.nbytes for o in outs if not o.dropped)
    student_fraction = weight_out / model_bytes if model_bytes else 1.0
    # The artifact: a zip of the result folder (weight files stored, not deflated) for a model
    # directory, the safetensors file for a bare state dict.
    artifact = weight_out + (other_bytes + ZIP_OVERHEAD_BYTES if fmt == "hf" else 0)

    factor, steps_peak = _steps_peak(path, tensors, steps, student_fraction, activation_memory_bytes)
    mode = evaluation_mode(fmt, path, model_bytes, memory_bytes) if enabled else "off"
    eval_peak = _eval_peak(mode, tensors, outs, evaluation)
    peak = max(steps_peak, eval_peak)
    if mode == "whole" and eval_peak > steps_peak:
        notes.append("peak: evaluation (each model loaded whole, one after the other)")
    notes.extend(_evaluation_notes(mode, path, memory_bytes))

    scratch = _scratch_bytes(artifact, fmt=fmt, stream=stream, enabled=enabled, mode=mode, float_bytes=float_bytes)
    scratch += input_bytes if input_on_scratch else 0
    if not input_on_scratch:
        notes.append("scratch: the input is hard-linked from local storage (no copy)")

    measured = dict(throughput or {})
    bps = measured.get(path) or DEFAULT_THROUGHPUT_BYTES_PER_S[path]
    seconds = FIXED_SECONDS + model_bytes * job_cost(steps, path) / bps
    if enabled:
        seconds += float(evaluation.get("budget_s", 30.0)) + EVAL_OVERHEAD_S
    if path not in measured:
        notes.append("seconds: default throughput (no worker has measured its own yet)")

    return {
        "path": path,
        "peak_memory_bytes": int(peak),
        "scratch_bytes": int(scratch),
        "artifact_bytes": int(artifact),
        "seconds": round(seconds, 2),
        "model_bytes": int(model_bytes),
        "parameters": int(sum(t.numel for t in tensors)),
        "largest_tensor_bytes": int(largest_f32),
        "baseline_bytes": BASELINE_BYTES,
        "memory_factor": round(factor, 3),
        "evaluation": enabled,
        "evaluation_mode": mode,
        "evaluation_peak_bytes": int(eval_peak) if mode in ("whole", "streamed") else None,
        "throughput_bytes_per_s": float(bps),
        "throughput_measured": path in measured,
        "notes": notes,
    }


def evaluation_mode(fmt: str, path: str, model_bytes: int, memory_bytes: int | None) -> str:
    """How the worker will measure the report: ``skipped`` (a bare state dict: no architecture),
    ``streamed`` (stream or blocks path, and ``EVAL_WHOLE_HOLD`` x the model over the memory
    budget less the baseline: worker/pipeline._fits_twice) or ``whole``. The whole path loads
    the model whole for its steps anyway and always evaluates whole."""
    if fmt != "hf":
        return "skipped"
    if path != "whole" and memory_bytes is not None and EVAL_WHOLE_HOLD * model_bytes >= memory_bytes - BASELINE_BYTES:
        return "streamed"
    return "whole"


def fits(plan: Mapping[str, Any], memory_bytes: int | None, scratch_bytes: int | None) -> bool:
    """Whether a worker with these budgets may run the plan (None: no budget, anything fits)."""
    return (memory_bytes is None or plan["peak_memory_bytes"] <= memory_bytes) and (
        scratch_bytes is None or plan["scratch_bytes"] <= scratch_bytes
    )


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


def over_budget_message(plan: Mapping[str, Any], memory_bytes: int | None, scratch_bytes: int | None, who: str) -> str:
    return (
        f"the job needs {gib(plan['peak_memory_bytes'])} of memory and {gib(plan['scratch_bytes'])} of scratch "
        f"disk ({plan['path']} path); {who} has at most {gib(memory_bytes or 0)} of memory and "
        f"{gib(scratch_bytes or 0)} of scratch disk (MODELPRESS_WORKER_MEMORY_BUDGET_MB, "
        f"MODELPRESS_WORKER_SCRATCH_BUDGET_MB)"
    )
