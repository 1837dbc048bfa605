"""Side-by-side benchmarks of the compression engine (issue: compression engine, point 14).

    .venv/bin/python bench/bench_compress.py            # everything (~3-6 min on 2 cores)
    .venv/bin/python bench/bench_compress.py --only prune,cast

Every case runs in a fresh subprocess on GPT-2-small-sized weights (124M parameters, random
init; 84.9M parameters = 340 MB fp32 in the Linear/Conv1D targets), so peak-memory readings do not
leak between cases. "Extra memory" is the peak resident set during the operation minus the
resident set just before it (VmHWM is reset through /proc/self/clear_refs). Ratios are computed
from numbers measured in this one run, on this machine, side by side.

These are benchmark targets, not timed tests: nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- child side --------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _build(kind: str = "gpt2"):  # noqa: ANN202
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 50257 vocab
    else:
        # GPT-2-small-sized, nn.Linear-based (the integer quantizers refuse GPT-2's Conv1D).
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=12,
                vocab_size=50257,
                tie_word_embeddings=True,
            )
        )
    model.eval()
    from worker.model_io import LoadedModel

    loaded = LoadedModel(format="hf", src_dir=Path("."), module=model)
    return loaded


class _Ctx:
    """The handlers' context, minus the database: progress goes nowhere."""

    def step_progress(self, note: str, fraction: float) -> None:  # noqa: D102
        pass

    def progress(self, stage: str, fraction: float) -> None:  # noqa: D102
        pass


def _warm_up(case: str) -> None:
    """Run the case once on a tiny model first: lazy imports and allocator arenas of the first
    call are start-up costs of a process, not of the operation (workers are long-lived)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from worker.model_io import LoadedModel

    if case.startswith(("weight_only_", "llama_")):
        module = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, vocab_size=100
            )
        )
    else:
        module = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100))
    _apply(case, LoadedModel(format="hf", src_dir=Path("."), module=module), torch)


def _apply(case: str, loaded, torch):  # noqa: ANN001, ANN202
    weights = [t.weight for t in loaded.targets()]
    if case == "clone_targets":
        return [w.clone() for w in weights]
    if case in ("clone_all", "llama_clone_all"):
        return [p.detach().clone() for p in loaded.module.parameters()]
    if case == "prune_study":
        from torch.nn.utils import prune
        from transformers.pytorch_utils import Conv1D

        mods = [
            m
            for m in loaded.module.modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not loaded.module.lm_head
        ]
        prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured, amount=0.5)
        for m in mods:
            prune.remove(m, "weight")
        return None
    from worker.methods import get

    if case == "prune_modelpress":
        spec = get("prune.magnitude")
        res = spec.handler(loaded, spec.params(sparsity=0.5), _Ctx())
        assert abs(res["achieved_sparsity"] - 0.5) < 0.005, res
        return None
    if case == "cast_fp16":
        spec = get("quantize.cast")
        return spec.handler(loaded, spec.params(dtype="float16"), _Ctx())
    if case.startswith("weight_only_"):
        bits = int(case.rsplit("_", 1)[1])
        spec = get("quantize.weight_only")
        return spec.handler(loaded, spec.params(bits=bits, group_size=128 if bits == 4 else None), _Ctx())
    raise SystemExit(f"unknown case {case}")


def _run_case(case: str) -> dict:
    import gc

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    _warm_up(case)
    loaded = _build("llama" if case.startswith(("weight_only_", "llama_")) else "gpt2")
    weights = [t.weight for t in loaded.targets()]
    target_bytes = sum(w.numel() * w.element_size() for w in weights)
    all_bytes = sum(p.numel() * p.element_size() for p in loaded.module.parameters())
    gc.collect()
    before = _rss_kb("VmRSS")
    _reset_peak()
    if case.startswith("weight_only_"):
        from worker.methods import get

        if get("quantize.weight_only") is None:
            return {"case": case, "skipped": "quantize.weight_only is not installed"}
    t0 = time.perf_counter()
    keep = _apply(case, loaded, torch)  # noqa: F841 - a clone must stay alive to be measured
    secs = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return {
        "case": case,
        "seconds": secs,
        "extra_peak_bytes": max(0, peak - before) * 1024,
        "target_bytes": target_bytes,
        "all_weight_bytes": all_bytes,
    }


# --- parent side -------------------------------------------------------------------------------


def _child(case: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--child", case], capture_output=True, text=True, cwd=ROOT, timeout=1800
        )
        if out.returncode != 0:
            raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if "skipped" in runs[0]:
        return runs[0]
    best = dict(runs[0])
    best["seconds"] = statistics.median(r["seconds"] for r in runs)
    best["extra_peak_bytes"] = statistics.median(r["extra_peak_bytes"] for r in runs)
    return best


def _mb(b: float) -> str:
    return f"{b / 1e6:,.0f} MB"


def bench_prune(repeats: int) -> list[str]:
    clone = _child("clone_targets", repeats)
    study = _child("prune_study", 1)  # ~20 s and GBs: once is enough
    ours = _child("prune_modelpress", repeats)
    tb = ours["target_bytes"]
    return [
        f"target weights: {_mb(tb)}",
        f"clone of targets        : {clone['seconds']:7.3f} s   extra {_mb(clone['extra_peak_bytes'])}",
        f"study recipe (global_unstructured + remove): {study['seconds']:7.3f} s   extra "
        f"{_mb(study['extra_peak_bytes'])}",
        f"modelpress prune.magnitude (global 50%)    : {ours['seconds']:7.3f} s   extra "
        f"{_mb(ours['extra_peak_bytes'])}",
        f"  speed-up vs study recipe : {study['seconds'] / ours['seconds']:6.1f}x   (target >= 20x)",
        f"  extra memory / targets   : {ours['extra_peak_bytes'] / tb:6.3f}    (target <= 0.1)",
        f"  time / one clone         : {ours['seconds'] / clone['seconds']:6.2f}x   (target <= 5x)",
    ]


def bench_cast(repeats: int) -> list[str]:
    clones = {"gpt2": _child("clone_all", repeats), "llama": _child("llama_clone_all", repeats)}
    lines = [
        f"GPT-2 small: all weights {_mb(clones['gpt2']['all_weight_bytes'])}, clone {clones['gpt2']['seconds']:.3f} s",
        f"Llama, GPT-2-small-sized (Linear layers): all weights {_mb(clones['llama']['all_weight_bytes'])}, clone "
        f"{clones['llama']['seconds']:.3f} s",
    ]
    for case in ("cast_fp16", "weight_only_8", "weight_only_4"):
        clone = clones["llama" if case.startswith("weight_only_") else "gpt2"]
        r = _child(case, repeats)
        if "skipped" in r:
            lines.append(f"{case:14s}: skipped ({r['skipped']})")
            continue
        lines.append(
            f"{case:14s}: {r['seconds']:7.3f} s = {r['seconds'] / clone['seconds']:5.2f}x clone  (target <= 2x)   "
            f"extra {_mb(r['extra_peak_bytes'])}"
        )
    return lines


def bench_e2e(repeats: int) -> list[str]:
    """A job through the API (embedded mode) against the same work in-process on the same model."""
    import httpx

    steps = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import torch; from transformers import GPT2Config, GPT2LMHeadModel; torch.manual_seed(0);"
                    f"GPT2LMHeadModel(GPT2Config()).save_pretrained('{tmp / 'gpt2'}')"
                ),
            ],
            check=True,
            cwd=ROOT,
        )
        # One process, like a worker: the first run pays the lazy imports and is dropped.
        out = subprocess.run(
            [sys.executable, __file__, "--inprocess", str(tmp / "gpt2"), json.dumps(steps), str(repeats + 1)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=3600,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        inproc = json.loads(out.stdout.strip().splitlines()[-1])
        port = 18777
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        env.update(MODELPRESS_DATA_DIR=str(tmp / "var"), MODELPRESS_MODE="embedded")
        srv = subprocess.Popen(
            [str(Path(sys.executable).parent / "modelpress"), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            key = (tmp / "var" / "api-key").read_text().strip()
            c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
            files = [("files", (p.name, p.open("rb"))) for p in sorted((tmp / "gpt2").iterdir())]
            model_id = c.post("/v1/models", files=files).json()["id"]
            api = []
            for _ in range(repeats + 1):  # the first job warms the worker (lazy imports)
                t0 = time.perf_counter()
                # The same work as in-process: no report measuring (bench/bench_report.py times that).
                job_id = c.post(
                    "/v1/jobs", json={"model_id": model_id, "steps": steps, "evaluation": {"enabled": False}}
                ).json()["id"]
                while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
                    time.sleep(0.1)  # a client polling faster would steal the worker's CPU on 2 cores
                assert job["status"] == "succeeded", job
                api.append(time.perf_counter() - t0)
        finally:
            srv.send_signal(15)  # serve stops its worker (signalling the group could wedge billiard)
            srv.wait(60)
    a, b = statistics.median(api[1:]), statistics.median(inproc[1:])
    return [
        f"in-process load+steps+save+zip: {b:7.3f} s (median of {repeats}, after 1 warm-up)",
        f"through the API (submit→succeeded): {a:7.3f} s",
        f"  overhead ratio: {a / b:5.3f}   (target <= 1.10)",
    ]


def _inprocess(model_dir: str, steps_json: str) -> float:
    """What the worker does for a job, without the database, queue or HTTP."""
    from worker import methods, model_io
    from worker.pipeline import _sha256, _zip_dir

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = model_io.load(Path(model_dir), "hf")
        for step in json.loads(steps_json):
            spec = methods.get(step["method"])
            spec.handler(loaded, spec.params.model_validate(step["params"]), _Ctx())
        model_io.save(loaded, Path(tmp) / "out", {"steps": json.loads(steps_json)})
        _zip_dir(Path(tmp) / "out", Path(tmp) / "model.zip", 1)
        _sha256(Path(tmp) / "model.zip")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="prune,cast,e2e")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--inprocess", nargs=3)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_run_case(args.child)))
        return
    if args.inprocess:
        model_dir, steps_json, n = args.inprocess
        print(json.dumps([_inprocess(model_dir, steps_json) for _ in range(int(n))]))
        return
    import platform

    print(
        f"# modelpress compression benchmarks  ({platform.node()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()})"
    )
    for name, fn in (("prune", bench_prune), ("cast", bench_cast), ("e2e", bench_e2e)):
        if name in args.only.split(","):
            print(f"\n## {name}")
            for line in fn(args.repeats):
                print(line, flush=True)


if __name__ == "__main__":
    main()
