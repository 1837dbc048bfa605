"""FP8 and FP4 on a real model (issue 22 item 4): perplexity of quantize.fp8 and quantize.fp4's
data-free schemes against 4-bit round-to-nearest in groups of 64, and the streaming pass's time.

    .venv/bin/python bench/bench_fp.py /tmp/gemma
    .venv/bin/python bench/bench_fp.py /tmp/gemma --schemes FP8_DYNAMIC,NVFP4A16 --ctx 256

Model: Gemma 3 270M as bench/bench_eval.py prepares it (weights dequantized from the published
Q4_K_M GGUF, saved as bfloat16 with Gemma's tokenizer, ``<bos>`` first): every figure is of that
model, not of Google's originals.

Each artifact is written by the job's streaming engine (worker/stream: tensor by tensor from the
shards, as a data-free job runs; tests/test_fp_quant.py checks it equals the in-memory path bit
for bit), unpacked, and loaded by plain transformers on this CPU, which dequantizes the FP8/FP4
weights to bfloat16 (and quantizes-dequantizes the activations in float where the scheme
quantizes them): the perplexities are those of the dequantized weights; no FP8/FP4 kernel runs.
Every model (the original too) runs in bfloat16 (FP4 weights decompress to the checkpoint's
dtype). Perplexity on worker/data/eval_en.txt, lines packed into sequences of at most ``--ctx``
tokens, ``<bos>`` first, the same token ids for every model (bench/bench_gguf.py's
``sequences``). The reference 4-bit baseline is ``quantize.weight_only`` bits 4, group_size 64,
symmetric (compressed-tensors pack-quantized). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "RTN_W4_G64": ("quantize.weight_only", {"bits": 4, "group_size": 64}),
    "FP8_DYNAMIC": ("quantize.fp8", {"scheme": "FP8_DYNAMIC"}),
    "FP8_BLOCK": ("quantize.fp8", {"scheme": "FP8_BLOCK"}),
    "NVFP4A16": ("quantize.fp4", {"scheme": "NVFP4A16"}),
    "MXFP4A16": ("quantize.fp4", {"scheme": "MXFP4A16"}),
}


def stream_job(src: Path, method: str, params: dict[str, Any], out: Path) -> tuple[float, dict[str, Any]]:
    """The artifact a data-free job writes (the streaming engine into a zip), unpacked into ``out``;
    (the pass's seconds, the step's metrics)."""
    from worker import methods
    from worker import stream as engine
    from worker.sinks import ZipSink

    spec = methods.get(method)
    assert spec is not None
    zpath = out.with_suffix(".zip")
    sink = ZipSink(zpath)
    extra = [p for p in src.iterdir() if p.name != "config.json" and not p.name.endswith(".safetensors")]
    # Built before the clock starts: the first FP step imports llm-compressor (~15 s here), which a
    # worker does once.
    step = spec.stream(spec.params.model_validate(params), None)
    t0 = time.perf_counter()
    result = engine.run_passes(
        src,
        "hf",
        [step],
        sink,
        scratch=out.parent,
        extra_files=extra,
        manifest={"modelpress_manifest": 1, "bench": "bench_fp"},
        shard_bytes=5 * 10**9,
    )
    sink.close()
    secs = time.perf_counter() - t0
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(out)
    zpath.unlink()
    return secs, result.step_metrics[0]


def main() -> None:
    from bench_gguf import perplexity, sequences

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="HF folder (bf16), e.g. /tmp/gemma")
    ap.add_argument("--schemes", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per evaluation sequence")
    ap.add_argument("--no-eval", action="store_true", help="stream passes only (their seconds), no perplexity")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    seqs = sequences(tok, args.ctx)
    n_tokens = sum(len(s) - 1 for s in seqs)

    def ppl(path: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path).eval()  # the checkpoint's dtype: bf16
        with torch.no_grad():
            logits = [model(torch.tensor([s])).logits[0].float().numpy() for s in seqs]
        return perplexity(logits, seqs)

    print(
        f"model {args.model}; {len(seqs)} sequences, {n_tokens} predicted tokens; "
        f"torch threads {torch.get_num_threads()}"
    )
    base = float("nan") if args.no_eval else ppl(args.model)
    print(f"original (bf16): perplexity {base:.4f}")
    rows: list[dict[str, Any]] = [{"name": "original", "perplexity": base, "ratio": 1.0}]
    work = Path(tempfile.mkdtemp(prefix="bench_fp-"))
    try:
        for name in [s.strip() for s in args.schemes.split(",") if s.strip()]:
            method, params = JOBS[name]
            out = work / name
            secs, metrics = stream_job(args.model, method, params, out)
            p = float("nan") if args.no_eval else ppl(out)
            size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            row = {
                "name": name,
                "method": method,
                "params": params,
                "perplexity": p,
                "ratio": p / base,
                "increase_pct": 100 * (p / base - 1),
                "relative_rms_error": metrics.get("relative_rms_error"),
                "stream_seconds": round(secs, 2),
                "weights_bytes": size,
            }
            rows.append(row)
            print(
                f"{name:12s} {method} {json.dumps(params)}: perplexity {p:.4f} (x{p / base:.4f}, "
                f"{row['increase_pct']:+.2f} %), weight rel. RMS error {row['relative_rms_error']}, "
                f"stream {secs:.1f} s, weights {size / 1e6:.1f} MB"
            )
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
