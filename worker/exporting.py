"""The export stage: the steps' safetensors result converted to the job's output format (GGUF for
llama.cpp, ONNX for ONNX Runtime) once the steps have run and been evaluated, packaged as the
job's artifact in place of the safetensors one.

Why after the steps and not instead of their save: every method writes compressed-tensors
safetensors (the format transformers and vLLM load), and an exporter reads that one format, so a
new method needs no export code and a new format no method code. The converters themselves are
worker/export/gguf.py and worker/export/onnx.py; this module only orchestrates: unpack, convert,
zip, measure, and turn a converter's failure into the job's ``export_failed`` error with nothing
left behind.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import exports

log = logging.getLogger("modelpress.worker")

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Tokens of each calibration text for a static int8 ONNX export, and how many texts at most:
# ONNX Runtime's calibrator runs the float model on each, so a few dozen short ones suffice.
CALIBRATION_TOKENS = 128
CALIBRATION_TEXTS = 32


class ExportFailed(Exception):
    """The converter refused or failed; the message names the tensor or operator."""


def wanted(output: dict[str, Any]) -> bool:
    return output.get("format", "safetensors") != "safetensors"


def unpack(artifact: Path, fmt: str, dest: Path) -> Path:
    """The steps' artifact as a model folder: the zip unpacked (an HF model)."""
    if fmt != "hf":
        raise ExportFailed("an export needs a Hugging Face model folder, not a bare safetensors file")
    with zipfile.ZipFile(artifact) as zf:
        zf.extractall(dest)
    return dest


def convert(
    output: dict[str, Any], src: Path, dest: Path, steps: list[dict[str, Any]], calibration: list[list[int]] | None
) -> dict[str, Any]:
    """Run the format's converter from ``src`` (a model folder) into the empty folder ``dest``;
    what it reports (files, bytes, types, seconds...). Any failure but a full disk (the job's
    ``scratch_full``) is ExportFailed, with what failed."""
    try:
        return _convert(output, src, dest, steps, calibration)
    except ExportFailed:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        raise ExportFailed(f"{e.__class__.__name__}: {e}") from e
    except Exception as e:  # a library's error on input it cannot handle (a torn shard, an operator)
        log.warning("export failed", exc_info=True)
        raise ExportFailed(f"{e.__class__.__name__}: {str(e)[:500]}") from e


def _convert(
    output: dict[str, Any], src: Path, dest: Path, steps: list[dict[str, Any]], calibration: list[list[int]] | None
) -> dict[str, Any]:
    fmt = output["format"]
    dest.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        from worker.export import gguf

        config = _config(src)
        gguf_type = output.get("type", "auto")
        if gguf_type == "auto":
            gguf_type = exports.resolve_gguf_type(steps, config)
        try:
            return dict(gguf.export_gguf(src, dest / f"model-{gguf_type}.gguf", gguf_type))
        except gguf.ExportError as e:
            raise ExportFailed(str(e)) from e
    if fmt == "onnx":
        from worker.export import onnx

        try:
            return dict(
                onnx.export_onnx(
                    src, dest, output.get("quantize"), calibration, reduce_range=bool(output.get("reduce_range", True))
                )
            )
        except onnx.ExportError as e:
            raise ExportFailed(str(e)) from e
    raise ExportFailed(f"unknown output format {fmt!r}")


def _config(src: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads((src / "config.json").read_text()))
    except (OSError, ValueError):
        return {}


def calibration_ids(src: Path, texts: list[str]) -> list[list[int]]:
    """Token ids of up to CALIBRATION_TEXTS texts, each cut to CALIBRATION_TOKENS, with the
    model's own tokenizer (tokenizer.json; never remote code)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    out = []
    for text in texts[:CALIBRATION_TEXTS]:
        ids = tok(text, truncation=True, max_length=CALIBRATION_TOKENS)["input_ids"]
        if ids:
            out.append(list(ids))
    return out


def package(src: Path, dest: Path, manifest: Path | None) -> None:
    """The export folder as the artifact zip: every entry stored (GGUF and ONNX weights do not
    deflate; a user may also read one entry with a Range request), plus the job's manifest."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        files = sorted(p for p in src.rglob("*") if p.is_file())
        if manifest is not None and manifest.is_file() and not (src / manifest.name).exists():
            files.append(manifest)
        for p in files:
            name = p.name if p == manifest else p.relative_to(src).as_posix()
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with p.open("rb") as fin, zf.open(info, "w", force_zip64=True) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def export_artifact(
    artifact: Path,
    fmt: str,
    work: Path,
    output: dict[str, Any],
    steps: list[dict[str, Any]],
    texts: list[str] | None = None,
    measure: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """Replace the steps' artifact (``artifact``, a zip) by the export's: (the new zip, the
    report's ``export`` section, what ``measure(export folder, export section)`` returned, run
    before the folder is packaged). Scratch folders are removed whatever happens; on failure the
    new zip is too (the caller's artifact is left as it was, for the caller to drop)."""
    t0 = time.perf_counter()
    src, dest = work / "export-src", work / "export-out"
    new = work / "export.zip"
    measured = None
    try:
        unpack(artifact, fmt, src)
        calibration = calibration_ids(src, texts) if texts and output.get("quantize") == "int8_static" else None
        result = convert(output, src, dest, steps, calibration)
        if measure is not None:
            measured = measure(dest, result)
        package(dest, new, src / "modelpress.json")
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
    artifact.unlink(missing_ok=True)
    section = {"format": output["format"], **{k: v for k, v in output.items() if k != "format"}, **result}
    section["total_seconds"] = round(time.perf_counter() - t0, 4)
    return new, section, measured


# --- measured in the runtime ---------------------------------------------------------------------

RUNTIME_KERNELS = {
    "gguf": {
        "runs_as": "llama.cpp",
        "kernel": "llama.cpp (llama-cpp-python) on the worker's CPU: its own kernels for each GGUF tensor type",
        "note": "both models ran in llama.cpp: the original as a 16-bit GGUF, the artifact as exported",
    },
    "onnx": {
        "runs_as": "onnxruntime",
        "kernel": "ONNX Runtime's CPU execution provider",
        "note": "both models ran in ONNX Runtime: the original exported in float32, the artifact as exported",
    },
}
# Tokens a generation speed is measured on (llama.cpp): a prompt, then this many new tokens.
GENERATION_PROMPT = 32
GENERATION_TOKENS = 32


def _causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def original_in_runtime(
    output: dict[str, Any], original_src: Path, dest: Path, config: dict[str, Any], n_ctx: int = 512
) -> Any:
    """The original model exported to the same runtime (a 16-bit GGUF; a float32 ONNX), and its runner."""
    dest.mkdir(parents=True, exist_ok=True)
    if output["format"] == "gguf":
        from worker.export import gguf
        from worker.runtimes.llamacpp import LlamaCppRunner

        dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
        path = dest / f"original-{'BF16' if dtype == 'bfloat16' else 'F16'}.gguf"
        gguf.export_gguf(original_src, path, path.stem.split("-")[-1])
        return LlamaCppRunner(str(path), n_ctx=n_ctx)
    from worker.export import onnx
    from worker.runtimes.ort import OrtRunner

    onnx.export_onnx(original_src, dest, None, None)
    return OrtRunner(dest)


def runner_of(output: dict[str, Any], exported: Path, export: dict[str, Any], n_ctx: int = 512) -> Any:
    if output["format"] == "gguf":
        from worker.runtimes.llamacpp import LlamaCppRunner

        return LlamaCppRunner(str(exported / str(export["file"])), n_ctx=n_ctx)
    from worker.runtimes.ort import OrtRunner

    return OrtRunner(exported)


_RUNTIME_MODULES = {"gguf": ("llama_cpp", "llama-cpp-python"), "onnx": ("onnxruntime", "onnxruntime")}


def runtime_missing(output: dict[str, Any]) -> str | None:
    """Why this worker cannot run the format's runtime, or None."""
    import importlib.util

    module, package = _RUNTIME_MODULES[output["format"]]
    if importlib.util.find_spec(module) is None:
        return f"{package} is not installed on this worker, so the export could not be measured in its runtime"
    return None


GGUF_WITHOUT_LLAMACPP = (
    "llama-cpp-python is not installed on this worker (pip install 'modelpress[llamacpp]', a source build: "
    "docs/EXPORTS.md), so the GGUF's speed was not measured in llama.cpp"
)


def measure_gguf_weights(evaluator: Any, original_src: Path, exported: Path, export: dict[str, Any]) -> dict[str, Any]:
    """Where llama.cpp is missing: quality and fidelity of the GGUF's weights as transformers'
    GGUF loader dequantizes them (the values llama.cpp computes with, in float), against the
    original in transformers; no latency (transformers' is not llama.cpp's)."""
    from transformers import AutoModelForCausalLM

    from worker import model_io

    original = model_io.load(original_src, "hf").module
    evaluator.measure_original(original)
    del original
    t0 = time.perf_counter()
    module = AutoModelForCausalLM.from_pretrained(
        exported, gguf_file=str(export["file"]), trust_remote_code=False, dtype="auto"
    ).eval()
    load_s = time.perf_counter() - t0
    kernel = {
        "runs_as": "decompressed",
        "kernel": "transformers' GGUF loader: the GGUF's weights dequantized to float",
        "note": GGUF_WITHOUT_LLAMACPP,
    }
    evaluator.measure_compressed_module(module, load_s, kernel)
    sections: dict[str, Any] = evaluator.sections()
    sections["speed"] = {"available": False, "reason": GGUF_WITHOUT_LLAMACPP}
    for key in ("quality", "fidelity"):
        if sections.get(key, {}).get("available"):
            sections[key]["measured_with"] = kernel["kernel"]
    return sections


def measure_in_runtime(
    evaluator: Any, output: dict[str, Any], original_src: Path, exported: Path, export: dict[str, Any], work: Path
) -> dict[str, Any]:
    """The report's speed, quality and fidelity sections from the runtime: the original exported
    to it and the artifact, side by side through the evaluator (worker/evaluate.py); for a GGUF
    decoder, llama.cpp's generation speed of both too."""
    from transformers import AutoConfig

    from worker.runtimes.module import wrap

    config = AutoConfig.from_pretrained(original_src, trust_remote_code=False)
    causal = _causal(config)
    scratch = work / "export-original"
    # llama.cpp keeps logits for every position of its context (vocab floats each): a context
    # just long enough for the evaluation's texts and the generation, not a fixed large one.
    n_ctx = max(int(evaluator.seq_len), GENERATION_PROMPT + GENERATION_TOKENS) + 8
    try:
        original = original_in_runtime(output, original_src, scratch, config.to_dict(), n_ctx)
        evaluator.measure_original(wrap(original, config, causal))
        t0 = time.perf_counter()
        compressed = runner_of(output, exported, export, n_ctx)
        load_s = time.perf_counter() - t0
        kernel = RUNTIME_KERNELS[output["format"]]
        evaluator.measure_compressed_module(wrap(compressed, config, causal), load_s, kernel)
        sections: dict[str, Any] = evaluator.sections()
        speed = sections.get("speed") or {}
        if output["format"] == "gguf" and causal and speed.get("available"):
            speed["generation"] = _generation(original, compressed, config)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return sections


def _generation(original: Any, compressed: Any, config: Any) -> dict[str, Any]:
    """llama.cpp's generation speed (tokens a second), the original's 16-bit GGUF against the
    artifact's, on the same prompt of random ids."""
    import random

    rng = random.Random(0)
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    prompt = [rng.randrange(vocab) for _ in range(GENERATION_PROMPT)]
    o = float(original.tokens_per_second(prompt, GENERATION_TOKENS))
    c = float(compressed.tokens_per_second(prompt, GENERATION_TOKENS))
    return {
        "prompt_tokens": GENERATION_PROMPT,
        "new_tokens": GENERATION_TOKENS,
        "original_tokens_per_s": round(o, 3),
        "compressed_tokens_per_s": round(c, 3),
        "speedup": round(c / o, 4) if o else None,
    }
