"""How much parallel compute the machine has: the same single-threaded work alone, then in one
process per core at once, side by side in one run.

    .venv/bin/python bench/bench_cores.py              # 3 rounds, every core
    .venv/bin/python bench/bench_cores.py --rounds 5 --procs 2

Two kinds of work, each in its own processes (no GIL, no shared memory):

* ``sha256``: hashlib over a 64 MiB buffer, 2.5 GiB a process (what the artifact writer, the
  upload's checksums and the SDK do per byte);
* ``quant4``: the streaming engine's 4-bit kernel (``QuantizeStep.rows``, groups of 128, one torch
  thread) over two bf16 matrices of 25 M weights, 10 passes (what a data-free 4-bit job does per
  weight).

For each: seconds for one process alone, then for ``--procs`` processes started together (each
one's own time), and the machine's parallel speed-up = procs x alone / mean(together). A machine
with that many independent cores gives ~procs; SMT siblings or a shared host give less, and every
CPU-bound target on this machine (issue 14's wall time against the I/O floor, issue 17's upload
against the raw write) is bounded by it. docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORK = {
    "sha256": """
import hashlib, time
b = bytes(64 << 20)
t = time.perf_counter()
for _ in range(40):
    hashlib.sha256(b).digest()
print(time.perf_counter() - t)
""",
    "quant4": """
import time, torch
torch.set_num_threads(1)
from worker import methods
from worker.shards import TensorSpec
spec = methods.get("quantize.weight_only")
step = spec.stream(spec.params.model_validate({"bits": 4, "group_size": 128}), None)
g = torch.Generator().manual_seed(0)
ws = [(torch.randn(8192, 3072, generator=g) * 0.02).to(torch.bfloat16),
      (torch.randn(3072, 8192, generator=g) * 0.02).to(torch.bfloat16)]
def one():
    for i, w in enumerate(ws):
        s = TensorSpec(f"l{i}.weight", w.dtype, tuple(w.shape))
        step.start(s, None, lambda: w)
        step.rows(s, None, w, 0)
one()
t = time.perf_counter()
for _ in range(10):
    one()
print(time.perf_counter() - t)
""",
}


def _run(kind: str, procs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ps = [
        subprocess.Popen([sys.executable, "-c", WORK[kind]], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for _ in range(procs)
    ]
    out = []
    for p in ps:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{kind}: a process failed (rc {p.returncode})")
        out.append(float(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="processes at once (default: every core)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="sha256,quant4")
    args = ap.parse_args()
    print(f"cpus {os.cpu_count()}, processes together {args.procs}, load average {os.getloadavg()[0]:.2f} at the start")
    for kind in args.kinds.split(","):
        alone: list[float] = []
        together: list[float] = []
        for _ in range(args.rounds):  # alternated, so both see the same minutes of the machine
            alone += _run(kind, 1)
            together.append(statistics.fmean(_run(kind, args.procs)))
        a, t = statistics.median(alone), statistics.median(together)
        print(
            f"{kind:7s} alone {a:6.2f} s (rounds {', '.join(f'{x:.2f}' for x in alone)}); "
            f"{args.procs} at once {t:6.2f} s each (rounds {', '.join(f'{x:.2f}' for x in together)}); "
            f"parallel speed-up {args.procs * a / t:.2f}x of {args.procs}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
