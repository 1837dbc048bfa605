"""Compression quality on a real pretrained model (issue #22, "Figures"): perplexity and wall time of
the service's methods and of its named recipes (core/recipes), one configuration after the other.

    nice -n 5 .venv/bin/python bench/bench_quality.py --model /tmp/gemma             # ~40 min, 2 busy cores
    nice -n 5 .venv/bin/python bench/bench_quality.py --model /tmp/gemma --write-measured \\
        --table /tmp/quality_table.md                                               # what the lead runs
    .venv/bin/python bench/bench_quality.py --model /tmp/gemma --only rtn-w4-g128 --windows 2  # smoke

Model: Gemma 3 270M as bench/bench_eval.py ``--keep`` saves it (bf16 Hugging Face folder with its
tokenizer, which puts ``<bos>`` first, as Gemma needs). **Its weights were dequantized from
Q4_K_M** (the only copy this project can obtain offline), so they are not Google's bf16 originals
and every figure here is of that model.

Text: Python's own documentation, shipped with the interpreter (``pydoc_data.topics.topics``, a
dict of topic -> text). The topics are sorted by name and alternated: even positions are the
calibration half, odd positions the evaluation half, so calibration and evaluation text are
disjoint. Each half is joined with blank lines and tokenized once (no special tokens).

Perplexity is measured here, not by the service (its evaluation is not used): ``--windows``
windows of ``--window`` tokens, each ``<bos>`` + the next ``window - 1`` tokens of the evaluation
stream, taken evenly spaced through it, the same windows for every configuration; the loss of
every token after ``<bos>``, exp of the mean. The original's perplexity is 1.00x.

Calibration: ``--calib-samples`` texts of ``--calib-tokens`` tokens (``<bos>`` included), cut the
same way from the calibration stream and decoded back to text: the job's dataset that calibrated
methods get (``ctx.samples()``, tokenized again by worker/llmc.py ``calibration_dataset`` with
``num_samples``/``max_length`` set to these numbers).

Each configuration: validated as a job's steps would be (``core.methods.validate_steps`` with the
model's config and tensor headers: a refusal is recorded with its 422 reason), then run in-process
through the handlers (``worker.methods.load_all()[name].handler(loaded, params, ctx)``), saved with
``worker.model_io.save`` (artifact bytes = the folder, tokenizer included, as the service zips it),
evaluated. By default (``--eval reload``) the perplexity is the saved artifact's, loaded back with
transformers in ``--eval-dtype`` (float32; a compressed-tensors artifact decompresses on a CPU:
quality of the dequantized weights) plus ``worker.ct_format.attach_online_transforms`` for
``transform.rotate`` style quip, and the original is evaluated in the same dtype.

Why the artifact and float32 (decided 2026-12-07, docs/QUALITY.md): the handlers' in-memory result
is not always what is saved (on this model the in-memory weight-only int8 result and its reloaded
artifact differ by 0.8 % in perplexity, and a float32 copy of an in-memory 4-bit result scored
3.3x where its artifact scores 2.06x on the same windows), and in bf16 small differences move this model's perplexity
by several %. ``--eval memory`` (the in-memory result in its own dtype, ``--reload-check`` for
some configurations side by side) is kept for quick looks.

Out of domain: every model is also evaluated on ``--ood-windows`` windows of the licence texts
under /usr/share/common-licenses (legal English, nothing like the calibration text), which tells
what a calibrated method learnt about Python's documentation from what it kept of the model.

Seconds: ``method`` = the handlers alone (calibration included); ``total`` = load + handlers + save
+ reload + evaluation. The machine is shared (load average printed): times are indicative, on the
same machine for all configurations.

``--write-measured`` writes core/recipes/measured.json (what ``GET /v1/recipes`` shows): for each
recipe of ``core.recipes.RECIPES``, the figures of the configuration with the same steps (or its
refusal). A benchmark, not a test: nothing here asserts a time or a quality.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_NAME = "Gemma 3 270M (weights dequantized from Q4_K_M), bf16"
T0 = time.perf_counter()


def log(msg: str) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)


# --- configurations ---------------------------------------------------------------------------------


@dataclass
class Config:
    key: str
    family: str
    steps: list[dict[str, Any]]
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def _s(method: str, **params: Any) -> dict[str, Any]:
    return {"method": method, "params": params}


def configurations(autoround_iters: int) -> list[Config]:
    """Cheap and data-free first, then the calibrated ones, the slowest (GPTQ with the MSE observer:
    ~50 min on 2 busy cores) last, so a time budget cuts those and says so."""
    gptq = "quantize.gptq"
    wo = "quantize.weight_only"
    return [
        Config("w8", "8-bit", [_s(wo, bits=8)]),
        Config("rtn-w4-g128", "4-bit", [_s(wo, bits=4, group_size=128)]),
        Config(
            "spinquant+gptq-w4-g128-mse",
            "4-bit",
            [_s("transform.rotate", style="spinquant"), _s(gptq, scheme="W4A16", group_size=128, observer="mse")],
        ),
        Config("fp8-dynamic", "fp8", [_s("quantize.fp8", scheme="FP8_DYNAMIC")]),
        Config("nvfp4a16", "fp4", [_s("quantize.fp4", scheme="NVFP4A16")]),
        Config("rtn-w4-g64", "4-bit", [_s(wo, bits=4, group_size=64)]),
        Config("magnitude-50-global", "50% unstructured", [_s("prune.magnitude", sparsity=0.5, scope="global")]),
        Config("wanda-50", "50% unstructured", [_s("prune.wanda", sparsity=0.5)]),
        Config("sparsegpt-50", "50% unstructured", [_s("prune.sparsegpt", sparsity=0.5)]),
        Config("sparsegpt-2:4", "2:4", [_s("prune.sparsegpt", mask="2:4")]),
        Config("gptq-w4-g128-minmax", "4-bit", [_s(gptq, scheme="W4A16", group_size=128, observer="minmax")]),
        # minmax, as gptq-w4-g128-minmax: rotation + GPTQ against GPTQ at equal settings.
        Config(
            "quip+gptq-w4-g128-minmax",
            "4-bit",
            [_s("transform.rotate", style="quip"), _s(gptq, scheme="W4A16", group_size=128, observer="minmax")],
        ),
        Config("gptq-w4-g64-minmax", "4-bit", [_s(gptq, scheme="W4A16", group_size=64, observer="minmax")]),
        Config("quip+rtn-w4-g128", "4-bit", [_s("transform.rotate", style="quip"), _s(wo, bits=4, group_size=128)]),
        Config(
            "spinquant+rtn-w4-g128",
            "4-bit",
            [_s("transform.rotate", style="spinquant"), _s(wo, bits=4, group_size=128)],
        ),
        Config("magnitude-50-layer", "50% unstructured", [_s("prune.magnitude", sparsity=0.5, scope="layer")]),
        # Per-channel int8 against int8 in groups: how much of w8's loss is the per-row range.
        Config("w8-g128", "8-bit", [_s(wo, bits=8, group_size=128)]),
        Config(
            f"autoround-w4-g128-{autoround_iters}it",
            "4-bit",
            [_s("quantize.autoround", scheme="W4A16", group_size=128, iters=autoround_iters)],
            note=f"iters {autoround_iters} (default 200)",
        ),
        Config("awq-w4-g128", "4-bit", [_s("quantize.awq", scheme="W4A16", group_size=128)]),
        Config("gptq-w4-g128-mse", "4-bit", [_s(gptq, scheme="W4A16", group_size=128, observer="mse")]),
        Config("gptq-w4-g64-mse", "4-bit", [_s(gptq, scheme="W4A16", group_size=64, observer="mse")]),
    ]


def _steps_key(steps: list[dict[str, Any]]) -> str:
    return json.dumps([{"method": s["method"], "params": s.get("params") or {}} for s in steps], sort_keys=True)


# --- text ---------------------------------------------------------------------------------------------


def text_halves() -> tuple[str, str, dict[str, Any]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = [topics[n] for n in names[0::2]]
    evals = [topics[n] for n in names[1::2]]
    info = {
        "source": f"pydoc_data.topics.topics (Python {platform.python_version()} documentation shipped with the "
        "interpreter)",
        "split": "topics sorted by name, alternated: even positions calibration, odd positions evaluation",
        "calibration_topics": len(calib),
        "evaluation_topics": len(evals),
    }
    return "\n\n".join(calib), "\n\n".join(evals), info


def _spread(stream: list[int], length: int, n: int) -> list[list[int]]:
    """``n`` chunks of ``length`` tokens, evenly spaced through ``stream`` (not overlapping)."""
    chunks = len(stream) // length
    if chunks < n:
        raise SystemExit(f"the text has {chunks} chunks of {length} tokens, fewer than {n}")
    picks = [round(i * (chunks - 1) / max(n - 1, 1)) for i in range(n)]
    return [stream[p * length : (p + 1) * length] for p in picks]


def eval_windows(tok: Any, text: str, n: int, window: int) -> Any:
    import torch

    stream = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    return torch.tensor([[bos, *c] for c in _spread(stream, window - 1, n)]), len(stream)


# General English that neither half of the Python reference resembles: the licence texts every
# Debian-based machine carries. A second evaluation out of the calibration's domain separates what a
# calibrated method learnt about Python's documentation from what it kept of the model.
OOD_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0")
OOD_DIR = Path("/usr/share/common-licenses")


def ood_text() -> tuple[str, str]:
    found = [OOD_DIR / f for f in OOD_FILES if (OOD_DIR / f).is_file()]
    if not found:
        raise SystemExit(f"no licence texts under {OOD_DIR}: pass --ood-windows 0")
    return "\n\n".join(p.read_text(errors="replace") for p in found), ", ".join(p.name for p in found)


def calibration_rows(tok: Any, text: str, n: int, tokens: int) -> list[dict[str, str]]:
    stream = tok(text, add_special_tokens=False)["input_ids"]
    return [{"text": tok.decode(c, skip_special_tokens=True)} for c in _spread(stream, tokens - 1, n)]


# --- measuring ------------------------------------------------------------------------------------------


def perplexity(model: Any, windows: Any, batch: int) -> float:
    import torch

    nll, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            ids = windows[i : i + batch]
            # transformers' loss: logits upcast to float32, every token after the first predicted.
            loss = model(input_ids=ids, labels=ids).loss
            n = ids.shape[0] * (ids.shape[1] - 1)
            nll += float(loss) * n
            count += n
    return float(torch.exp(torch.tensor(nll / count)))


def reloaded(art: Path, dtype_name: str) -> Any:
    """The artifact as transformers loads it (weights decompressed in the checkpoint's own dtype, as
    a runtime gets them), then cast to ``dtype_name`` for the arithmetic. Loading straight into
    float32 is not the same: some compressed-tensors formats decompress lazily on the first forward
    pass and NVFP4 then fails (bf16 weights in a float32 model)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(art).eval()
    with torch.no_grad():  # not inference_mode: the decompressed weights are written in place
        m(input_ids=torch.tensor([[m.config.bos_token_id or 0, 1]]))  # decompresses what is left
    return m.to(getattr(torch, dtype_name))


def folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def weight_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


class BenchContext:
    """The MethodContext a handler gets here: the calibration rows as the job's dataset."""

    def __init__(self, rows: list[dict[str, str]], work_dir: Path) -> None:
        from core.config import Settings

        self.rows = rows
        self.work_dir = work_dir
        self.settings = Settings()
        self._last = -1.0

    def step_progress(self, note: str, fraction: float) -> None:
        if fraction - self._last >= 0.25 or fraction >= 1.0:
            self._last = fraction
            log(f"    {fraction:4.0%} {note}")

    def samples(self, which: str = "train") -> list[dict[str, str]]:
        return list(self.rows)

    def cancel_requested(self) -> bool:
        return False

    def load_model(self, model_id: str) -> Any:
        raise LookupError(model_id)


def model_info(src: Path) -> Any:
    from core.jobs import plan as planner
    from core.methods import ModelInfo

    config = json.loads((src / "config.json").read_text())
    tensors: list[Any] = []
    for p in sorted(src.glob("*.safetensors")):
        with p.open("rb") as f:
            tensors += planner.read_header(f, 100 << 20)
    return ModelInfo(
        format="hf",
        architecture=(config.get("architectures") or [None])[0],
        config=config,
        files=tuple(p.name for p in src.iterdir()),
        tensors=lambda: tensors,
    )


def with_calibration(steps: list[dict[str, Any]], registry: dict[str, Any], args: argparse.Namespace) -> list[dict]:
    """The steps with the bench's calibration size on every step that takes a dataset."""
    out = []
    for s in steps:
        params = dict(s.get("params") or {})
        spec = registry.get(s["method"])
        if spec is not None and spec.needs_data:
            fields = spec.params.model_fields
            if "num_samples" in fields:
                params["num_samples"] = args.calib_samples
            if "max_length" in fields:
                params["max_length"] = args.calib_tokens
        out.append({"method": s["method"], "params": params})
    return out


def run_config(
    cfg: Config,
    args: argparse.Namespace,
    info: Any,
    windows: Any,
    ood: Any,
    ctx: BenchContext,
    original: dict[str, Any],
) -> dict[str, Any]:
    import torch

    from core.methods import StepError, load_all, validate_steps
    from worker import methods as worker_methods
    from worker import model_io

    core_registry = load_all()
    missing = [s["method"] for s in cfg.steps if s["method"] not in core_registry]
    if missing:
        return {"skipped": f"method {', '.join(missing)} not registered in this checkout"}
    steps = with_calibration(cfg.steps, core_registry, args)
    try:
        steps = validate_steps(steps, info, has_dataset=True)
    except StepError as e:
        return {"refused": "; ".join(err["msg"] for err in e.errors)}
    try:
        handlers = worker_methods.load_all()
    except Exception as e:  # another helper's half-written method: report, do not crash the run
        return {"skipped": f"worker.methods.load_all() failed: {type(e).__name__}: {e}"}
    specs = []
    for s in steps:
        if s["method"] not in handlers:
            return {"skipped": f"method {s['method']} has no worker handler in this checkout"}
        spec = handlers[s["method"]]
        specs.append((spec, spec.params.model_validate(s["params"])))

    t_all = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix=f"bq-{cfg.key.replace(':', '')}-", dir=args.scratch))
    result: dict[str, Any] = {"steps": steps}
    try:
        loaded = model_io.load(args.model, "hf")
        t0 = time.perf_counter()
        metrics = []
        for spec, params in specs:
            log(f"  {spec.name} {json.dumps(params.model_dump(exclude_defaults=True), sort_keys=True)}")
            metrics.append(spec.handler(loaded, params, ctx))
        result["method_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  method done in {result['method_seconds']} s")
        evals = {}
        if args.eval == "memory":
            m = loaded.module
            evals["memory"] = round(perplexity(m, windows, args.batch), 4)
            log(f"  perplexity of the in-memory result {evals['memory']}")
            if ood is not None:
                result["ood_perplexity"] = round(perplexity(m, ood, args.batch), 4)
                result["ood_ratio"] = round(result["ood_perplexity"] / original["ood_perplexity"], 4)
                log(f"  out-of-domain perplexity {result['ood_perplexity']} ({result['ood_ratio']}x)")
        t_save = time.perf_counter()
        model_io.save(loaded, out / "artifact", {"modelpress_manifest": 1, "bench": cfg.key})
        result["save_seconds"] = round(time.perf_counter() - t_save, 1)
        del loaded
        gc.collect()
        art = out / "artifact"
        result["artifact_bytes"] = folder_bytes(art)
        result["weight_bytes"] = weight_bytes(art)
        if args.eval == "reload" or cfg.key in args.reload_check:
            m = reloaded(art, args.eval_dtype)
            if any(s["method"] == "transform.rotate" and s["params"].get("style") == "quip" for s in steps):
                from worker.ct_format import attach_online_transforms

                result["online_transforms"] = attach_online_transforms(m, art)
            evals["reload"] = round(perplexity(m, windows, args.batch), 4)
            log(f"  perplexity of the saved artifact reloaded with transformers {evals['reload']}")
            if ood is not None and args.eval == "reload":
                result["ood_perplexity"] = round(perplexity(m, ood, args.batch), 4)
                result["ood_ratio"] = round(result["ood_perplexity"] / original["ood_perplexity"], 4)
                log(f"  out-of-domain perplexity {result['ood_perplexity']} ({result['ood_ratio']}x)")
            del m
            gc.collect()
        result["perplexity"] = evals[args.eval]
        if len(evals) == 2:
            result["reload_perplexity"] = evals["reload"]
        result["total_seconds"] = round(time.perf_counter() - t_all, 1)
        result["perplexity_ratio"] = round(result["perplexity"] / original["perplexity"], 4)
        result["size_ratio"] = round(result["artifact_bytes"] / original["artifact_bytes"], 4)
        result["weight_ratio"] = round(result["weight_bytes"] / original["weight_bytes"], 4)
        fallbacks = [m.get("group_fallbacks") for m in metrics if isinstance(m, dict) and m.get("group_fallbacks")]
        if fallbacks:
            result["group_fallbacks"] = fallbacks
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e)[:300]}", "steps": steps}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        torch.set_num_threads(args.threads)  # a library may have changed it
    return result


# --- output -----------------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.0f}"


def _f(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def table(original: dict[str, Any], configs: list[Config], recipe_of: dict[str, list[str]]) -> str:
    head = (
        "| configuration | target | recipe | perplexity | × original | licences ppl | × original | method s "
        "| total s | artifact MB | × size | weights × | note |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    o_ood = original.get("ood_perplexity")
    rows = [
        f"| original | | | {original['perplexity']:.3f} | 1.00 | {_f(o_ood)} | {'1.00' if o_ood else ''} | "
        f"| {original['total_seconds']} | {_mb(original['artifact_bytes'])} | 1.00 | 1.00 | |"
    ]
    for c in configs:
        r = c.result
        rec = ", ".join(recipe_of.get(c.key, []))
        if "perplexity" in r:
            note = c.note
            if "reload_perplexity" in r:
                note = (
                    note + "; " if note else ""
                ) + f"artifact reloaded with transformers: {r['reload_perplexity']:.3f}"
            rows.append(
                f"| {c.key} | {c.family} | {rec} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.3f} "
                f"| {_f(r.get('ood_perplexity'))} | {_f(r.get('ood_ratio'))} | {r['method_seconds']} "
                f"| {r['total_seconds']} | {_mb(r['artifact_bytes'])} | {r['size_ratio']:.2f} "
                f"| {r['weight_ratio']:.2f} | {note} |"
            )
        else:
            why = r.get("refused") and f"refused (422): {r['refused']}" or r.get("skipped") or r.get("error")
            why = str(why).replace("|", "/").replace("\n", " ")
            rows.append(f"| {c.key} | {c.family} | {rec} | | | | | | | | | | {why} |")
    return "\n".join([head, *rows])


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{cpu or platform.processor()}, {os.cpu_count()} cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), shared with other work"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/gemma"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument(
        "--ood-windows",
        type=int,
        default=16,
        help="windows of --window tokens of out-of-domain English (the licence texts under "
        "/usr/share/common-licenses) also evaluated for every configuration; 0: none",
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--eval-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype the original and the reloaded artifacts are evaluated in",
    )
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--autoround-iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="configuration keys to run (default: all)")
    ap.add_argument(
        "--eval",
        choices=("memory", "reload"),
        default="reload",
        help="evaluate the saved artifact reloaded with transformers in --eval-dtype (default) or the handlers' "
        "in-memory result in its own dtype (quicker, but not always what was saved: see the module's docstring)",
    )
    ap.add_argument(
        "--reload-check",
        nargs="*",
        default=["gptq-w4-g128-mse", "quip+gptq-w4-g128-minmax", "fp8-dynamic"],
        help="configurations whose artifact is also reloaded and evaluated (the two perplexities side by side)",
    )
    ap.add_argument("--budget-s", type=float, default=2700, help="skip configurations that would start after this")
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every configuration's result here")
    ap.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a --json of an earlier run with the same settings: its original and its measured or refused "
        "configurations are reused, the others (skipped, failed, new) run",
    )
    ap.add_argument("--table", type=Path, default=None, help="write the Markdown table (and the command) here")
    ap.add_argument("--write-measured", action="store_true", help="write core/recipes/measured.json")
    args = ap.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")  # compressed-tensors' progress bars: one line per layer
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from core.recipes import MEASURED_PATH, RECIPES

    hf_logging.disable_progress_bar()

    torch.set_num_threads(args.threads)
    command = "nice -n 5 .venv/bin/python bench/bench_quality.py " + " ".join(sys.argv[1:])
    load_start = os.getloadavg()
    log(f"command: {command}")
    log(f"machine: {machine()}; load average at start {load_start[0]:.1f} {load_start[1]:.1f} {load_start[2]:.1f}")
    log(f"model: {args.model} — {MODEL_NAME}")

    tok = AutoTokenizer.from_pretrained(args.model)
    calib_text, eval_text, text_info = text_halves()
    windows, eval_stream = eval_windows(tok, eval_text, args.windows, args.window)
    rows = calibration_rows(tok, calib_text, args.calib_samples, args.calib_tokens)
    ood = None
    if args.ood_windows:
        ood_txt, ood_names = ood_text()
        ood, ood_stream = eval_windows(tok, ood_txt, args.ood_windows, args.window)
    eval_info = {
        "text": f"{text_info['source']}: the evaluation half ({text_info['evaluation_topics']} topics, "
        f"{eval_stream} tokens); {text_info['split']}",
        "windows": args.windows,
        "tokens": args.window,
        "selection": "windows of <bos> + the next tokens, evenly spaced through the evaluation stream",
        "evaluated_tokens": args.windows * (args.window - 1),
        "dtype": args.eval_dtype,
        "evaluated": f"the {args.eval} result (memory: the handlers' in-memory model)",
    }
    if ood is not None:
        eval_info["out_of_domain"] = (
            f"licence texts ({ood_names}; {ood_stream} tokens): {args.ood_windows} windows of {args.window} tokens"
        )
    calib_info = {
        "text": f"the calibration half ({text_info['calibration_topics']} topics), disjoint from the evaluation text",
        "samples": args.calib_samples,
        "tokens_per_sample": args.calib_tokens,
        "autoround_iters": args.autoround_iters,
    }
    log(f"eval: {args.windows} x {args.window} tokens of {eval_stream}; calib {len(rows)} x {args.calib_tokens}")

    settings = {"eval": eval_info, "calibration": calib_info, "model": str(args.model)}
    previous: dict[str, Any] = {}
    commands = [command]
    if args.resume:
        prev = json.loads(args.resume.read_text())
        if "settings" in prev and prev["settings"] != settings:
            raise SystemExit(f"--resume {args.resume}: measured with other settings: {prev['settings']}")
        original = prev["original"]
        previous = {k: v for k, v in prev["configs"].items() if "perplexity" in v or "refused" in v}
        commands = [*prev.get("commands", ["(an earlier run of this script, same settings)"]), command]
        log(f"resuming {args.resume}: original and {len(previous)} configurations reused")
    else:
        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.eval_dtype)).eval()
        original = {
            "perplexity": round(perplexity(m, windows, args.batch), 4),
            **({"ood_perplexity": round(perplexity(m, ood, args.batch), 4)} if ood is not None else {}),
            "artifact_bytes": folder_bytes(args.model),
            "weight_bytes": weight_bytes(args.model),
        }
        original["total_seconds"] = round(time.perf_counter() - t0, 1)
        del m
        gc.collect()
    log(f"original perplexity {original['perplexity']} ({original['total_seconds']} s)")

    info = model_info(args.model)
    ctx = BenchContext(rows, Path(tempfile.mkdtemp(prefix="bq-work-")))
    configs = configurations(args.autoround_iters)
    if args.only is not None:
        configs = [c for c in configs if c.key in args.only]
    by_steps = {_steps_key(c.steps): c for c in configs}
    recipe_of: dict[str, list[str]] = {}
    for name, recipe in RECIPES.items():
        c = by_steps.get(_steps_key(recipe.expand()))
        if c is None and (args.only is None or f"recipe:{name}" in args.only):
            c = Config(f"recipe:{name}", recipe.target, recipe.expand())
            configs.append(c)
            by_steps[_steps_key(c.steps)] = c
        if c is not None:
            recipe_of.setdefault(c.key, []).append(name)

    for i, c in enumerate(configs, 1):
        if c.key in previous:
            c.result = previous[c.key]
            continue
        if time.perf_counter() - T0 > args.budget_s:
            c.result = {"skipped": f"time budget of {args.budget_s:.0f} s spent before it started"}
            log(f"[{i}/{len(configs)}] {c.key}: {c.result['skipped']}")
            continue
        log(f"[{i}/{len(configs)}] {c.key} (load average {os.getloadavg()[0]:.1f})")
        c.result = run_config(c, args, info, windows, ood, ctx, original)
        r = c.result
        if "perplexity" in r:
            log(
                f"  {c.key}: perplexity {r['perplexity']} ({r['perplexity_ratio']}x), method {r['method_seconds']} s, "
                f"total {r['total_seconds']} s, {r['artifact_bytes']} bytes ({r['size_ratio']}x)"
            )
        else:
            log(f"  {c.key}: {json.dumps({k: v for k, v in r.items() if k != 'steps'})}")
        if args.json:
            done = {c.key: c.result for c in configs if c.result}
            record = {"settings": settings, "commands": commands, "original": original, "configs": done}
            args.json.write_text(json.dumps(record, indent=1))
    shutil.rmtree(ctx.work_dir, ignore_errors=True)

    load_end = os.getloadavg()
    md = table(original, configs, recipe_of)
    evaluated = (
        "the handlers' in-memory result" if args.eval == "memory" else "the saved artifact reloaded with transformers"
    )
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    header = "\n".join(
        [
            f"Model: {MODEL_NAME}: its weights were dequantized from Q4_K_M (not Google's bf16 originals); "
            "every figure is of that model.",
            "",
            f"Evaluation: {eval_info['text']}; {args.windows} windows of {args.window} tokens (<bos> first), "
            f"evenly spaced; perplexity over {eval_info['evaluated_tokens']} predicted tokens, in {args.eval_dtype}, "
            "of "
            f"{evaluated}"
            + (f"; out of domain: {eval_info['out_of_domain']} (`licences ppl`)" if ood is not None else "")
            + f" (artifacts also reloaded with transformers for {', '.join(args.reload_check) or 'none'}: "
            "the note).",
            f"Calibration: {calib_info['text']}; {args.calib_samples} samples x {args.calib_tokens} tokens; "
            f"AutoRound {args.autoround_iters} iters.",
            "",
            "Command"
            + ("s (the later reusing the earlier's results)" if len(commands) > 1 else "")
            + ": "
            + "; ".join(f"`{c}`" for c in commands),
            "",
            f"Machine: {machine()}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end (other "
            f"jobs running: times are indicative). Measured {stamp}.",
            "",
            "`method s`: the handlers alone (calibration included); `total s`: load + method + evaluation + save "
            "(+ reload and its evaluation where noted). `artifact MB`: the saved folder, tokenizer (~33 MB) "
            "included; `weights ×`: the .safetensors files against the original's.",
            "",
        ]
    )
    print("\n" + header + "\n" + md, flush=True)
    if args.table:
        args.table.write_text(header + "\n" + md + "\n")
    if args.write_measured:
        recipes: dict[str, Any] = {}
        for name, recipe in RECIPES.items():
            c = by_steps.get(_steps_key(recipe.expand()))
            r = c.result if c else {}
            if "perplexity" in r:
                recipes[name] = {
                    "perplexity": r["perplexity"],
                    "perplexity_ratio": r["perplexity_ratio"],
                    "seconds": r["method_seconds"],
                    "total_seconds": r["total_seconds"],
                    "artifact_bytes": r["artifact_bytes"],
                    "size_ratio": r["size_ratio"],
                    **(
                        {"ood_perplexity": r["ood_perplexity"], "ood_perplexity_ratio": r["ood_ratio"]}
                        if "ood_ratio" in r
                        else {}
                    ),
                }
            elif "refused" in r:
                recipes[name] = {"refused": r["refused"]}
        record = {
            "model": MODEL_NAME,
            "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "command": " && ".join(commands),
            "eval": eval_info,
            "calibration": calib_info,
            "original_perplexity": original["perplexity"],
            "original_ood_perplexity": original.get("ood_perplexity"),
            "original_artifact_bytes": original["artifact_bytes"],
            "recipes": recipes,
        }
        MEASURED_PATH.write_text(json.dumps(record, indent=2) + "\n")
        log(f"wrote {MEASURED_PATH} ({len(recipes)} of {len(RECIPES)} recipes)")


if __name__ == "__main__":
    main()
