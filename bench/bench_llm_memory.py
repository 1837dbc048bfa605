"""Peak memory of the llm-compressor methods, next to the model's own size (issue: LLM-grade methods).

    .venv/bin/python bench/bench_llm_memory.py        # ~3-6 min on 2 cores

Each case runs in a fresh subprocess: build a Llama (8 layers, hidden 1024, FFN 2816; ~110M
parameters, ~440 MB in float32) with the tests' word-level tokenizer, load it as the worker does,
then run the method's handler on 64 calibration texts of up to 256 tokens. "Extra" is the peak
resident set during the method (VmHWM, reset through /proc/self/clear_refs just before) minus the
resident set just before it: what the method needs on top of the loaded model. llm-compressor's
sequential pipeline keeps one layer's calibration state at a time; a method that held copies of
the whole model would show extra memory of one or more model sizes.

A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    ("prune.magnitude", {"sparsity": 0.5}),
    ("prune.wanda", {"sparsity": 0.5, "num_samples": 64, "max_length": 256}),
    ("prune.sparsegpt", {"sparsity": 0.5, "num_samples": 64, "max_length": 256}),
    ("quantize.gptq", {"scheme": "W4A16", "group_size": 128, "num_samples": 64, "max_length": 256}),
]


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _child(model_dir: str, method: str, params_json: str) -> None:
    from tests.tokenizer_util import sentences
    from worker import methods, model_io

    texts = [" ".join(sentences()[i % 20] for i in range(k, k + 12)) for k in range(64)]  # ~100-250 tokens each

    class Ctx:
        def samples(self, which: str = "train") -> list[dict]:
            return [{"text": t} for t in texts]

        def step_progress(self, *a: object) -> None: ...

        def progress(self, *a: object) -> None: ...

    spec = methods.load_all()[method]
    loaded = model_io.load(Path(model_dir), "hf")
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.module.parameters())
    # Weights loaded from safetensors may still be file-backed pages that nobody has read: touch
    # them all first, so that "before" holds the whole model and "extra" is the method's own need.
    for p in loaded.module.parameters():
        float(p.detach().sum())
    before = _kb("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    spec.handler(loaded, spec.params.model_validate(json.loads(params_json)), Ctx())
    peak = _kb("VmHWM") * 1024
    print(json.dumps({"model_bytes": model_bytes, "rss_before": before, "peak": peak}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_util import _special_ids, save_with_tokenizer, vocab

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama"
        save_with_tokenizer(
            LlamaForCausalLM(
                LlamaConfig(
                    num_hidden_layers=8,
                    hidden_size=1024,
                    intermediate_size=2816,
                    num_attention_heads=16,
                    num_key_value_heads=4,
                    vocab_size=len(vocab()),
                    max_position_embeddings=512,
                    **_special_ids(),
                )
            ),
            model_dir,
        )
        print(f"# llm-compressor methods: extra peak memory (2 cores, torch {torch.__version__})")
        print("| method | model MB | RSS before MB | peak MB | extra MB | extra / model |")
        print("|---|---|---|---|---|---|")
        for method, params in CASES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(model_dir), method, json.dumps(params)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=3600,
            )
            if out.returncode != 0:
                print(f"| {method} | failed: {out.stderr[-500:]!r} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = r["peak"] - r["rss_before"]
            mb = 1024 * 1024
            print(
                f"| {method} | {r['model_bytes'] / mb:.0f} | {r['rss_before'] / mb:.0f} | {r['peak'] / mb:.0f} | "
                f"{extra / mb:.0f} | {extra / r['model_bytes']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
