"""The block path's save alone, in-process: module by module (worker/ct_offload.save_offloaded, what
model_io.save runs on the block path) against llm-compressor's save_pretrained of the same model
(what it ran before), on one generated Llama checkpoint loaded with its weights on disk.

    .venv/bin/python bench/bench_block_save.py --size 2GB            # 17 blocks, ~2 min here
    .venv/bin/python bench/bench_block_save.py --size 2GB --modes new

The result is quantized W4A16 (groups of 128, LM head ignored) by llm-compressor's
QuantizationModifier on its data-free pipeline: round-to-nearest stands in for GPTQ's calibration
(40-50 minutes on these 2 shared cores at this size), and the save sees what it sees after GPTQ: the same modules,
schemes and pack-quantized format. For each save: anonymous memory (RssAnon, worker/memory.py's
PeakMemory, sampled every 20 ms) above the baseline taken just before it, after returning the heap's
free pages to the system (malloc_trim), so that memory freed earlier and reused does not hide what
the save allocates; the same peak is also sampled every 5 ms from a separate process
(``added_mib_outside``), which C code holding the GIL cannot hold off. With both modes the two
outputs are compared: every tensor, config.json, index.
A benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20

# Samples RssAnon of the process named on its command line every 5 ms from a process of its own
# (a sampling thread in the measured process can be held off by C code that keeps the GIL), and
# prints the highest value (bytes) when its stdin is closed.
SAMPLER = """
import select, sys
path, peak = f"/proc/{sys.argv[1]}/status", 0
while True:
    with open(path) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    if select.select([sys.stdin], [], [], 0.005)[0]:
        print(peak, flush=True)
        break
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GB", help="checkpoint size (bench/gen_checkpoint.py; default 2GB: 17 blocks)")
    ap.add_argument("--modes", default="new,old", help="new (module by module), old (llm-compressor's save_pretrained)")
    ap.add_argument(
        "--shard", type=int, default=512 << 20, help="max shard bytes (the block path's, worker/pipeline.py)"
    )
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors import safe_open

    from bench.gen_checkpoint import generate
    from worker import llmc, model_io
    from worker.memory import PeakMemory

    root = Path(tempfile.mkdtemp(prefix="mp-block-save-", dir=args.workdir))
    try:
        t = time.perf_counter()
        ckpt = generate(root / "ckpt", args.size)
        weights = sum(p.stat().st_size for p in (root / "ckpt").glob("*.safetensors"))
        print(
            f"checkpoint: {ckpt.shape}, {weights / 1e9:.3f} GB of safetensors, {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        loaded = model_io.load(root / "ckpt", "hf", root / "offload")
        t = time.perf_counter()
        oneshot(
            model=loaded.module,
            pipeline="datafree",
            output_dir=None,
            log_dir=None,
            recipe=[QuantizationModifier(config_groups=llmc.config_groups("W4A16", 128), ignore=["lm_head"])],
        )
        llmc.set_quantized_saver(loaded, "quantize.rtn")
        print(
            f"W4A16 RTN: {time.perf_counter() - t:.1f} s; module by module: {model_io._saves_module_by_module(loaded)}",
            flush=True,
        )
        results = {}
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            outside = subprocess.Popen(
                [sys.executable, "-c", SAMPLER, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.2)
            peak = PeakMemory()
            base = peak._anon * 1024
            t = time.perf_counter()
            if mode == "new":
                model_io.save(loaded, root / mode, {"bench": True}, max_shard_size=args.shard)
            else:
                loaded.saver(loaded, root / mode, args.shard)  # llm-compressor's save_pretrained, as before
            seconds = time.perf_counter() - t
            anon = peak.result()["peak_anon_bytes"]
            anon_outside = int(outside.communicate("\n")[0])
            results[mode] = {
                "seconds": round(seconds, 1),
                "baseline_anon_mib": round(base / MiB),
                "peak_anon_mib": round(anon / MiB),
                "added_mib": round((anon - base) / MiB),
                "added_mib_outside": round((anon_outside - base) / MiB),
                "added_x_model": round((max(anon, anon_outside) - base) / weights, 3),
                "load_average": os.getloadavg()[0],
            }
            print(f"{mode}: {json.dumps(results[mode])}", flush=True)
        if {"new", "old"} <= set(results):

            def names(d: Path) -> dict[str, Path]:
                out = {}
                for f in sorted(d.glob("*.safetensors")):
                    with safe_open(str(f), "pt") as h:
                        out.update({k: f for k in h})
                return out

            a, b = names(root / "old"), names(root / "new")
            assert sorted(a) == sorted(b), "different tensor names"
            for k in a:
                with safe_open(str(a[k]), "pt") as ha, safe_open(str(b[k]), "pt") as hb:
                    x, y = ha.get_tensor(k), hb.get_tensor(k)
                    assert x.dtype == y.dtype and torch.equal(x, y), k
            same_cfg = (root / "old" / "config.json").read_text() == (root / "new" / "config.json").read_text()
            idx = "model.safetensors.index.json"
            same_idx = (
                not (root / "old" / idx).exists()
                or (root / "old" / idx).read_bytes() == (root / "new" / idx).read_bytes()
            )
            print(
                f"outputs: {len(a)} tensors bit-identical; config.json identical {same_cfg}; index identical {same_idx}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
