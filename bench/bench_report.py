"""What the job report measures, on a model big enough for kernels to matter (issue: reports).

    .venv/bin/python bench/bench_report.py            # ~2-4 min on 2 cores

Builds a random-init Llama (6 layers, hidden 768, FFN 3072, vocab 8000: ~60M parameters), then for
each method runs the worker's own code in this one process: load → Evaluator.measure_original →
the method → save the artifact → Evaluator.measure_compressed (the artifact as transformers loads
it). It prints the report's latencies side by side, what ran (``runs_as``), the speed-up the report
claims (none for decompressed artifacts) and the fidelity figures, plus how long measuring took
next to the method itself. Inputs are random token ids (the model has no tokenizer), batch 4 x 128.

A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    ("quantize.dynamic_int8", {}),
    ("prune.structured", {"ffn": 0.5}),
    ("quantize.weight_only", {"bits": 8}),
    ("prune.magnitude", {"sparsity": 0.5}),
    ("quantize.cast", {"dtype": "bfloat16"}),
]
SETTINGS = {"enabled": True, "batch_size": 4, "seq_len": 128, "runs": 7, "warmup": 2, "max_samples": 8}


class _Ctx:
    """The little of JobContext that these methods use."""

    def progress(self, *a: object) -> None: ...

    def step_progress(self, *a: object) -> None: ...

    def has_samples(self, which: str = "train") -> bool:
        return False


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker import evaluate, methods, model_io

    methods.load_all()
    root = Path(tempfile.mkdtemp(prefix="bench-report-"))
    torch.manual_seed(0)
    src = root / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=6,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=8000,
            max_position_embeddings=256,
        )
    ).save_pretrained(src)
    print(
        f"# report benchmark ({platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, engine {torch.backends.quantized.engine})"
    )
    print(
        f"# model: Llama 6x768, FFN 3072, vocab 8000; timed pass batch {SETTINGS['batch_size']} x "
        f"{SETTINGS['seq_len']} "
        f"tokens, median of {SETTINGS['runs']} after {SETTINGS['warmup']} warm-up"
    )
    print()
    print(
        "| method | original ms | compressed ms | runs as | speed-up claimed | latency ratio | KL mean | top-1 agree | "
        "measure s | method s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, params in CASES:
        spec = methods.get(name)
        loaded = model_io.load(src, "hf")
        ev = evaluate.Evaluator(SETTINGS, src, lambda: ([], {"source": "none"}))
        t0 = time.perf_counter()
        ev.measure_original(loaded.module)
        t_orig = time.perf_counter() - t0
        t0 = time.perf_counter()
        spec.handler(loaded, spec.params.model_validate(params), _Ctx())
        t_method = time.perf_counter() - t0
        out = root / name
        model_io.save(loaded, out, {})
        del loaded
        t0 = time.perf_counter()
        ev.measure_compressed(out)
        t_comp = time.perf_counter() - t0
        s = ev.sections()
        sp, f = s["speed"], s["fidelity"]
        speedup = f"{sp['speedup']:.2f}x" if sp.get("speedup") else "none"
        print(
            f"| {name} {params or ''} | {sp['original']['median_ms']:.1f} | {sp['compressed']['median_ms']:.1f} | "
            f"{sp['runs_as']} | {speedup} | {sp['latency_ratio']:.3f} | {f['kl_mean']:.2e} | "
            f"{f['top1_agreement']:.3f} | "
            f"{t_orig + t_comp:.1f} | {t_method:.1f} |"
        )
        if "decompressed" in sp:
            print(
                "|  ...same artifact as transformers runs it (decompressed) | | "
                f"{sp['decompressed']['median_ms']:.1f} | | | "
                f"{sp['decompressed']['median_ms'] / sp['original']['median_ms']:.3f} | | | | |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
