"""How much of an 8-bit format's perplexity cost on the benchmark model is the format, and how much
is the model (docs/QUALITY.md, "What these figures do not show"): the same Linear weights (every
one but the LM head) rounded in several ways and perturbed by plain noise, each scored on the same
windows as bench/bench_quality.py cuts them (the Python reference's evaluation half and the licence
texts), in float32. Weights are set in place on one float32 copy of the model; nothing goes through
the service (the service's FP8 is bench_quality.py's ``fp8-dynamic`` row).

    .venv/bin/python bench/bench_weight_noise.py --model /tmp/gemma --windows 6    # ~4 min, 2 cores

Rows:
* ``fp8 per channel``: each row scaled so its largest |w| is 448, cast to float8_e4m3fn and back
  (FP8_DYNAMIC's weights, without its activation quantization);
* ``int8 per channel``: round-to-nearest, symmetric, one scale per row (``quantize.weight_only``
  bits 8 without groups);
* ``uniform relative noise ±3 %``: each weight times (1 + u), u uniform in [-0.03, 0.03], independent;
* ``jittered`` / ``fp8 of jittered``: each weight times (1 + 0.02 n), n standard normal, which moves
  it off the 4-bit grid the Q4_K_M dequantization left it on (~16 values per block of 32), then
  the FP8 rounding of that, against the jittered model.

A benchmark, not a test: it prints ratios to the original on both texts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/gemma"))
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import bench_quality as bq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    _, eval_text, _ = bq.text_halves()
    pydoc, _ = bq.eval_windows(tok, eval_text, args.windows, args.window)
    licences, _ = bq.eval_windows(tok, bq.ood_text()[0], args.windows, args.window)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}

    def score(weights: dict[str, Any]) -> tuple[float, float]:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(weights[n])
        return bq.perplexity(model, pydoc, 2), bq.perplexity(model, licences, 2)

    def fp8(w: torch.Tensor) -> torch.Tensor:
        s = w.abs().amax(1, keepdim=True) / 448
        return (w / s).to(torch.float8_e4m3fn).float() * s

    def int8(w: torch.Tensor) -> torch.Tensor:
        s = w.abs().amax(1, keepdim=True) / 127
        return (w / s).round().clamp(-128, 127) * s

    g = torch.Generator().manual_seed(1)
    noise = {n: w * (1 + 0.03 * (torch.rand(w.shape, generator=g) * 2 - 1)) for n, w in original.items()}
    g = torch.Generator().manual_seed(3)
    jittered = {n: w * (1 + 0.02 * torch.randn(w.shape, generator=g)) for n, w in original.items()}

    base = score(original)
    print(
        f"{args.windows} windows of {args.window} tokens per text, float32; original perplexity "
        f"{base[0]:.3f} (Python reference) {base[1]:.3f} (licences)"
    )
    jit = score(jittered)
    rows = [
        ("fp8 per channel", score({n: fp8(w) for n, w in original.items()}), base),
        ("int8 per channel", score({n: int8(w) for n, w in original.items()}), base),
        ("uniform relative noise ±3 %", score(noise), base),
        ("jittered (2 % gaussian, off the 4-bit grid)", jit, base),
        ("fp8 per channel of jittered, against jittered", score({n: fp8(w) for n, w in jittered.items()}), jit),
    ]
    print(f"{'weights':50s} {'Python ref x':>13s} {'licences x':>11s}")
    for name, (a, b), (a0, b0) in rows:
        print(f"{name:50s} {a / a0:13.4f} {b / b0:11.4f}")


if __name__ == "__main__":
    main()
