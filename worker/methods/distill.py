"""``distill``: the handler (core/methods/distill.py has the method's parameters, checks and description)."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from core.methods.distill import DistillParams, evenly_spaced, head_kind
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel

# The progress notes' running loss: the mean of the last this many steps' losses.
RUNNING_WINDOW = 10


@handler("distill")
def distill(model: LoadedModel, params: DistillParams, ctx: MethodContext) -> Metrics:
    """Knowledge distillation into a smaller student (fewer layers, a smaller config, or an uploaded model)."""
    import torch

    teacher = model.module
    kind = head_kind(type(teacher).__name__)
    if kind is None:
        raise ValueError(f"{type(teacher).__name__} has no causal-LM or sequence-classification head to distill")
    torch.manual_seed(params.seed)  # random parts of a student, and the batch order
    tok = _tokenizer(model.src_dir)
    samples = ctx.samples("train")
    student, init, out_dtype = _student(teacher, kind, params, ctx)
    _check_compatible(teacher, student, kind)
    pad_id = _pad_both(tok, teacher, student, kind)
    max_len = _max_length(params.max_length, teacher.config, student.config)
    rows, label_map, kept = _encode(tok, samples, teacher.config, kind, max_len)
    rows, held, split = _split(rows, kept, samples, params)
    pairs = _hidden_pairs(teacher, student, init, params)

    device = next(teacher.parameters()).device
    teacher.eval()
    student.to(device=device, dtype=torch.float32)  # train in fp32 whatever the stored dtype
    run = _Distiller(teacher, student, kind, params, rows, pad_id, device, pairs)
    heldout = _Heldout(run, held, split)
    heldout.measure("teacher", teacher, ctx)
    heldout.measure("student_before", student, ctx)
    try:
        initial = run.probe_loss()
        run.train(ctx)
        final = run.probe_loss()
    finally:
        run.close()  # the hooks on the teacher's layers go: the teacher outlives this step
    heldout.measure("student_after", student, ctx, fraction=1.0)
    student.eval()

    student.config.architectures = [type(student).__name__]
    if out_dtype.is_floating_point and out_dtype != torch.float32:
        student.to(out_dtype)
    # save() writes model.module with save_pretrained: the artifact's config.json is the student's.
    model.module = student
    return {
        "student": init["source"],
        "head": kind,
        "initial_loss": round(initial, 6),
        "final_loss": round(final, 6),
        "first_step_loss": None if run.first is None else round(run.first, 6),
        "last_step_loss": None if run.last is None else round(run.last, 6),
        "running_loss": None if not run.recent else round(sum(run.recent) / len(run.recent), 6),
        "steps": run.done,
        "planned_steps": run.total,
        "stopped_by_cancel": run.stopped,
        "samples": len(rows),
        "max_length": max_len,
        "trainable_parameters": run.trainable,
        "heldout": heldout.metrics(),
        "hidden": _hidden_metrics(params, pairs, run),
        "lr_schedule": {
            "schedule": params.lr_schedule,
            "warmup_steps": params.warmup_steps,
            "lr": params.lr,
            "last_lr": None if run.last_lr is None else float(f"{run.last_lr:.6g}"),
        },
        **_sizes(teacher, student, init),
        "label_map": label_map,
    }


def _hidden_metrics(params: DistillParams, pairs: list[tuple[int, int]] | None, run: _Distiller) -> Metrics | None:
    if params.hidden_loss is None or pairs is None:
        return None
    return {
        "loss": params.hidden_loss,
        "weight": params.hidden_weight,
        # [student layer, teacher layer] whose outputs are compared
        "pairs": [list(p) for p in pairs],
        # Significant digits, not decimals: an MSE in small units would round to 0.
        "initial": None if run.probe_hidden[0] is None else float(f"{run.probe_hidden[0]:.6g}"),
        "final": None if run.probe_hidden[-1] is None else float(f"{run.probe_hidden[-1]:.6g}"),
    }


def _split(
    rows: list[tuple[list[int], int | None]], kept: list[int], samples: list[dict[str, Any]], params: DistillParams
) -> tuple[list[tuple[list[int], int | None]], list[tuple[list[int], int | None]], dict[str, Any]]:
    """Training rows, held-out rows, and how they were split. The held-out rows are the last
    samples of the dataset (a contiguous tail: neighbouring samples of one document stay on one
    side more often than with an interleaved pick), fewer any text that also occurs in training."""
    n = len(rows)
    wanted = min(math.floor(n * params.holdout + 1e-9), params.holdout_max_samples)
    if params.holdout == 0:
        return rows, [], {"skipped": "holdout is 0: every sample trains"}
    if wanted < 1 or n - wanted < 1:
        return rows, [], {"skipped": f"{n} samples with a token: too few to hold {params.holdout:g} of them out"}
    train, tail = rows[: n - wanted], list(zip(rows[n - wanted :], kept[n - wanted :], strict=True))
    train_texts = {samples[i]["text"] for i in kept[: n - wanted]}
    held = [r for r, i in tail if samples[i]["text"] not in train_texts]
    split = {
        "source": f"the last {wanted} samples of the dataset, not trained on",
        "dropped_duplicates": wanted - len(held),
    }
    if not held:
        return train, [], {**split, "skipped": "every held-out text also occurs among the training samples"}
    return train, held, split


def _student(teacher: Any, kind: str, params: DistillParams, ctx: MethodContext) -> tuple[Any, dict[str, Any], Any]:
    """The student (uploaded, or built from the teacher), how it was made, and the dtype the
    artifact is saved in (the uploaded student's own, else the teacher's)."""
    out_dtype = next(teacher.parameters()).dtype
    if params.student_model_id is None:
        student, init = _build_student(teacher, params)
        return student, init, out_dtype
    student = ctx.load_model(params.student_model_id).module
    if student is None or head_kind(type(student).__name__) != kind:
        raise ValueError(f"the student model must have the teacher's kind of head ({kind})")
    init = {"source": "student_model_id", "from_teacher_layers": None, "initialised_from_teacher": 0.0}
    return student, init, next(student.parameters()).dtype


def _pad_both(tok: Any, teacher: Any, student: Any, kind: str) -> int:
    """The padding id of the batches. Decoder classifiers find each sample's last token through
    config.pad_token_id: without one they refuse batches > 1. Padding with that id (or the
    tokenizer's) keeps both models right."""
    pad_id = _pad_id(tok, teacher.config if kind == "sequence_classification" else None)
    if kind == "sequence_classification":
        for m in (teacher, student):
            if m.config.pad_token_id is None:
                m.config.pad_token_id = pad_id
    return pad_id


def _encode(
    tok: Any, samples: list[dict[str, Any]], config: Any, kind: str, max_len: int
) -> tuple[list[tuple[list[int], int | None]], dict[str, int] | None, list[int]]:
    """The rows (token ids, label id) of every sample with a token, the label map of a classifier
    (None for a causal LM), and the index in ``samples`` of each row."""
    encoded = tok([s["text"] for s in samples], truncation=True, max_length=max_len)["input_ids"]
    vocab = config.vocab_size
    rows: list[tuple[list[int], int | None]] = []
    kept: list[int] = []
    label_map: dict[str, int] | None = None
    labels: list[int | None] = [None] * len(samples)
    if kind == "sequence_classification":
        label_map, labels = _label_ids(samples, config)
    for i, (ids, label) in enumerate(zip(encoded, labels, strict=True)):
        if not ids:
            continue
        if max(ids) >= vocab:
            raise ValueError(
                f"the tokenizer produced token id {max(ids)} but the model's vocabulary has {vocab} entries: "
                "tokenizer and model do not match"
            )
        rows.append((ids, label))
        kept.append(i)
    if not rows:
        raise ValueError("no sample of the dataset has a token after tokenization")
    return rows, label_map, kept


def _sizes(teacher: Any, student: Any, init: dict[str, Any]) -> Metrics:
    """Parameter counts and layer counts of both models, for the job's metrics."""
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in student.parameters())
    return {
        "teacher_parameters": teacher_params,
        "student_parameters": student_params,
        "parameter_ratio": round(student_params / teacher_params, 6) if teacher_params else None,
        "layers": {
            "teacher": getattr(teacher.config, "num_hidden_layers", None),
            "student": getattr(student.config, "num_hidden_layers", None),
            "from_teacher_layers": init["from_teacher_layers"],
        },
        "initialised_from_teacher": init["initialised_from_teacher"],
    }


class _Taps:
    """Forward hooks keeping the outputs (the hidden states) of some transformer blocks, in order."""

    def __init__(self, modules: list[Any]) -> None:
        self.out: list[Any] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._keep(i)) for i, m in enumerate(modules)]

    def _keep(self, i: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            # A block returns its hidden states, or a tuple starting with them (older layers).
            self.out[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def states(self) -> list[Any]:
        return list(self.out)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.out = [None] * len(self.out)


def _hidden_pairs(
    teacher: Any, student: Any, init: dict[str, Any], params: DistillParams
) -> list[tuple[int, int]] | None:
    """[(student layer, teacher layer)] whose outputs the hidden-state loss compares: each student
    layer and the teacher layer it was initialised from. None when there is no hidden loss."""
    if params.hidden_loss is None:
        return None
    src = init["from_teacher_layers"]
    if not src:  # the submit check refuses these; a worker running an older spec says it again
        raise ValueError("hidden_loss needs a student built from the teacher (layers or student_config)")
    widths = [getattr(m.config, "hidden_size", None) for m in (teacher, student)]
    if widths[0] != widths[1]:
        raise ValueError(
            f"hidden_loss needs the teacher's hidden width {widths[0]} in the student (it has {widths[1]})"
        )
    n_t, n_s = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    if _layer_stack(teacher, n_t) is None or _layer_stack(student, n_s) is None:
        raise ValueError(f"hidden_loss: no stack of {n_t} / {n_s} transformer blocks found in {type(teacher).__name__}")
    return list(enumerate(src[:n_s]))


class _Distiller:
    """The training loop: batches of the rows, the teacher's and the student's logits (and aligned
    hidden states), the distillation loss (worker/ops/distill.py has the math), the learning-rate
    schedule, the optimizer's steps."""

    def __init__(
        self,
        teacher: Any,
        student: Any,
        kind: str,
        params: DistillParams,
        rows: list[tuple[list[int], int | None]],
        pad_id: int,
        device: Any,
        pairs: list[tuple[int, int]] | None = None,
    ) -> None:
        self.teacher, self.student, self.kind, self.params = teacher, student, kind, params
        self.rows, self.pad_id, self.device = rows, pad_id, device
        bs = params.batch_size
        per_epoch = math.ceil(len(rows) / bs)
        self.total = params.steps if params.steps is not None else params.epochs * per_epoch
        # Initial / final loss on the same fixed batches (dataset order, no dropout): comparable
        # numbers, unlike single noisy training batches.
        self.probe = [
            self.batch_of(list(range(i, min(i + bs, len(rows))))) for i in range(0, min(len(rows), 4 * bs), bs)
        ]
        self.first: float | None = None
        self.last: float | None = None
        self.last_lr: float | None = None
        self.recent: deque[float] = deque(maxlen=RUNNING_WINDOW)
        self.probe_hidden: list[float | None] = []
        self.done = 0
        self.trainable = 0
        self.stopped = False
        # CE alone (alpha 1, no hidden loss) needs no teacher forward pass while training.
        self.needs_teacher = params.alpha < 1.0 or pairs is not None
        self.taps: tuple[_Taps, _Taps] | None = None
        if pairs is not None:
            t_stack = teacher.get_submodule(_layer_stack(teacher, teacher.config.num_hidden_layers))
            s_stack = student.get_submodule(_layer_stack(student, student.config.num_hidden_layers))
            self.taps = (_Taps([s_stack[j] for j, _ in pairs]), _Taps([t_stack[t] for _, t in pairs]))

    def close(self) -> None:
        if self.taps is not None:
            for t in self.taps:
                t.close()
            self.taps = None

    def batch_of(self, idx: list[int], rows: list[tuple[list[int], int | None]] | None = None) -> dict[str, Any]:
        import torch

        rows = self.rows if rows is None else rows
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = rows[i][0]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
        out = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.kind == "sequence_classification":
            out["labels"] = torch.tensor([rows[i][1] for i in idx], dtype=torch.long, device=self.device)
        return out

    def forward(self, m: Any, b: dict[str, Any]) -> Any:
        kw = {"use_cache": False} if self.kind == "causal_lm" else {}
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw).logits

    def loss_of(self, b: dict[str, Any]) -> Any:
        import torch

        from worker.ops import distill as ops

        p = self.params
        s_logits = self.forward(self.student, b)
        if not self.needs_teacher:
            ce = (
                ops.causal_lm_ce(s_logits, b["input_ids"], b["attention_mask"])
                if self.kind == "causal_lm"
                else (ops.classifier_ce(s_logits, b["labels"]))
            )
            return ops.DistillLoss(ce, ce, ce.detach() * 0.0)
        with torch.no_grad():
            t_logits = self.forward(self.teacher, b)
        if self.kind == "causal_lm":
            loss = ops.causal_lm_loss(s_logits, t_logits, b["input_ids"], b["attention_mask"], p.alpha, p.temperature)
        else:
            loss = ops.classifier_loss(s_logits, t_logits, b["labels"], p.alpha, p.temperature)
        if self.taps is None or p.hidden_loss is None:
            return loss
        s_taps, t_taps = self.taps
        hidden = ops.hidden_state_loss(s_taps.states(), t_taps.states(), p.hidden_loss, b["attention_mask"])
        return ops.with_hidden(loss, hidden, p.hidden_weight)

    def probe_loss(self) -> float:
        import torch

        self.student.eval()
        with torch.no_grad():
            losses = [self.loss_of(b) for b in self.probe]
        self.student.train()
        hidden = [float(x.hidden) for x in losses if x.hidden is not None]
        self.probe_hidden.append(sum(hidden) / len(hidden) if hidden else None)
        return sum(float(x.total) for x in losses) / len(losses)

    def _batches(self):  # noqa: ANN202 - endless shuffled epochs
        import torch

        gen = torch.Generator().manual_seed(self.params.seed)
        bs = self.params.batch_size
        while True:
            order = torch.randperm(len(self.rows), generator=gen).tolist()
            for i in range(0, len(order), bs):
                yield order[i : i + bs]

    def train(self, ctx: MethodContext) -> None:
        """Up to ``total`` optimizer steps; stops early when the job is cancelled."""
        import torch

        from worker.ops.distill import lr_factor

        p, student, total = self.params, self.student, self.total
        frozen = _freeze_embeddings(student) if p.freeze_embeddings else []
        trainable = [q for q in student.parameters() if q.requires_grad]
        self.trainable = sum(q.numel() for q in trainable)
        opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.0)
        student.train()
        t_report = t_cancel = time.monotonic()
        it = self._batches()
        for step in range(1, total + 1):
            lr = p.lr * lr_factor(step, total, p.warmup_steps, p.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = self.loss_of(self.batch_of(next(it)))
            value = float(loss.total.detach())
            if not math.isfinite(value):
                raise ValueError(f"the loss became {value} at step {step}; try a lower lr")
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            self.done, self.last, self.last_lr = step, value, lr
            self.first = value if self.first is None else self.first
            self.recent.append(value)
            now = time.monotonic()
            if now - t_report >= 0.5 or step == total:
                running = sum(self.recent) / len(self.recent)
                ctx.step_progress(
                    f"step {step}/{total} loss {value:.4f} running {running:.4f} lr {lr:.2e}", step / total
                )
                t_report = now
            # The pipeline only looks for a cancel between steps: a long training run looks itself.
            if now - t_cancel >= 5.0 and step < total:
                t_cancel = now
                if ctx.cancel_requested():
                    self.stopped = True
                    break
        for q in frozen:
            q.requires_grad_(True)
        student.eval()


def _freeze_embeddings(student: Any) -> list[Any]:
    """Stop training the token embeddings and the LM head (the same tensor when tied); return
    the parameters frozen here, to thaw after training."""
    frozen = []
    for m in (student.get_input_embeddings(), student.get_output_embeddings()):
        w = getattr(m, "weight", None)
        if w is not None and w.requires_grad:
            w.requires_grad_(False)
            frozen.append(w)
    return frozen


class _Heldout:
    """The held-out figures of the teacher and of the student before and after training:
    perplexity (causal LM) or accuracy (classifier) on rows that never train."""

    def __init__(self, run: _Distiller, rows: list[tuple[list[int], int | None]], split: dict[str, Any]) -> None:
        self.run, self.rows, self.split = run, rows, split
        self.values: dict[str, float | None] = {}
        self.mean_nll: dict[str, float] = {}
        self.tokens = 0

    def measure(self, name: str, model: Any, ctx: MethodContext, fraction: float = 0.0) -> None:
        import torch

        from worker.ops.distill import causal_lm_nll

        if not self.rows:
            return
        ctx.step_progress(f"held-out {name.replace('_', ' ')}: {len(self.rows)} samples", fraction)
        was_training = model.training
        model.eval()
        bs, n = self.run.params.batch_size, len(self.rows)
        nll = 0.0
        count = 0
        with torch.no_grad():
            for i in range(0, n, bs):
                b = self.run.batch_of(list(range(i, min(i + bs, n))), self.rows)
                logits = self.run.forward(model, b)
                if self.run.kind == "causal_lm":
                    s, c = causal_lm_nll(logits, b["input_ids"], b["attention_mask"])
                    nll, count = nll + s, count + c
                else:
                    nll += float((logits.argmax(dim=-1) == b["labels"]).sum())
                    count += len(b["labels"])
        model.train(was_training)
        self.tokens = count
        if self.run.kind != "causal_lm":
            self.values[name] = round(nll / count, 6) if count else None
            return
        if count:
            mean = nll / count
            self.mean_nll[name] = round(mean, 6)
            # exp overflows a float past ~709: the mean loss still says how bad it is.
            self.values[name] = round(math.exp(mean), 4) if mean < 700 else None

    def metrics(self) -> Metrics:
        if not self.rows:
            return {"metric": None, **self.split}
        causal = self.run.kind == "causal_lm"
        out: Metrics = {
            "metric": "perplexity" if causal else "accuracy",
            "samples": len(self.rows),
            ("tokens" if causal else "labeled"): self.tokens,
            **self.values,
            **self.split,
        }
        t, after = self.values.get("teacher"), self.values.get("student_after")
        if causal:
            out["mean_nll"] = self.mean_nll
            out["student_after_vs_teacher"] = round(after / t, 4) if after is not None and t else None
        return out


def _tokenizer(src_dir: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        # trust_remote_code stays off: uploaded files are never code.
        return AutoTokenizer.from_pretrained(str(src_dir), trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"the model's tokenizer could not be loaded: {e}") from e


def _pad_id(tok: Any, config: Any) -> int:
    for v in (
        getattr(config, "pad_token_id", None) if config is not None else None,
        tok.pad_token_id,
        tok.eos_token_id,
    ):
        if isinstance(v, int):
            return v
    # Causal LMs only: padded positions are masked out of attention and of both losses.
    return 0


def _max_length(requested: int, *configs: Any) -> int:
    from worker.model_io import max_positions

    limit = requested
    for c in configs:
        pos = max_positions(c)
        if pos is not None and pos > 1:
            limit = min(limit, pos)
    return limit


def _label_ids(samples: list[dict[str, Any]], config: Any) -> tuple[dict[str, int], list[int]]:
    missing = sum(1 for s in samples if "label" not in s)
    if missing:
        raise ValueError(
            f"distilling a sequence classifier needs a labeled dataset: {missing} of {len(samples)} samples have no "
            "'label'"
        )
    distinct = sorted({s["label"] for s in samples})
    n = config.num_labels
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if all(isinstance(lab, str) and lab in label2id for lab in distinct):
        mapping = {lab: label2id[lab] for lab in distinct}  # the teacher's own class names
    elif all(isinstance(lab, int) and 0 <= lab < n for lab in distinct):
        mapping = {lab: lab for lab in distinct}
    elif len(distinct) <= n:
        mapping = {lab: i for i, lab in enumerate(distinct)}
    else:
        raise ValueError(f"the dataset has {len(distinct)} labels but the model classifies into {n}")
    return {str(k): v for k, v in mapping.items()}, [mapping[s["label"]] for s in samples]


def _check_compatible(teacher: Any, student: Any, kind: str) -> None:
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"the student's vocabulary ({student.config.vocab_size}) differs from the teacher's "
            f"({teacher.config.vocab_size})"
        )
    if kind == "sequence_classification" and student.config.num_labels != teacher.config.num_labels:
        raise ValueError(
            f"the student has {student.config.num_labels} classes, the teacher {teacher.config.num_labels}"
        )


def _layer_stack(module: Any, n: int) -> str | None:
    """Name of the ModuleList holding the n transformer blocks (transformer.h, model.layers, ...)."""
    from torch import nn

    for name, m in module.named_modules():
        if name and isinstance(m, nn.ModuleList) and len(m) == n:
            return name
    return None


def _build_student(teacher: Any, params: DistillParams) -> tuple[Any, dict[str, Any]]:
    import copy

    cfg = copy.deepcopy(teacher.config)
    n_teacher = getattr(cfg, "num_hidden_layers", None)
    if params.layers is not None:
        if not isinstance(n_teacher, int):
            raise ValueError(f"{type(cfg).__name__} has no num_hidden_layers to shrink")
        if params.layers >= n_teacher:
            raise ValueError(f"layers must be below the teacher's {n_teacher} layers")
        cfg.num_hidden_layers = params.layers
        source = "layers"
    else:
        for key, value in (params.student_config or {}).items():
            if not hasattr(cfg, key):
                raise ValueError(f"student_config: {type(cfg).__name__} has no field {key!r}")
            setattr(cfg, key, value)
        source = "student_config"
    n_student = getattr(cfg, "num_hidden_layers", None)
    src = evenly_spaced(n_teacher, n_student) if isinstance(n_teacher, int) and isinstance(n_student, int) else None
    # Per-layer config lists (e.g. layer_types: sliding vs full attention) follow the copied layers.
    # A layer_types the user set in student_config is kept as given.
    layer_types = getattr(cfg, "layer_types", None)
    user_set = bool(params.student_config and "layer_types" in params.student_config)
    if (
        src is not None
        and isinstance(layer_types, list)
        and len(layer_types) == n_teacher
        and n_student != n_teacher
        and not user_set
    ):
        cfg.layer_types = [layer_types[i] for i in src[:n_student]]
    try:
        student = type(teacher)(cfg)
    except Exception as e:
        raise ValueError(f"the student config does not make a model: {e}") from e
    copied = _init_from_teacher(student, teacher, src, n_teacher)
    total = sum(p.numel() for p in student.parameters())
    return student, {
        "source": source,
        "from_teacher_layers": src[:n_student] if src is not None else None,
        "initialised_from_teacher": round(copied / total, 6) if total else 0.0,
    }


def _init_from_teacher(student: Any, teacher: Any, src: list[int] | None, n_teacher: int | None) -> int:
    """Copy every teacher tensor whose (layer-mapped) name and shape match; return the number of
    student parameters so initialised (the rest keep their random init)."""
    import torch

    prefix = _layer_stack(teacher, n_teacher) if isinstance(n_teacher, int) else None
    t_sd = teacher.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, value in student.state_dict().items():
        t_key = key
        if prefix and src and key.startswith(prefix + "."):
            j, _, tail = key[len(prefix) + 1 :].partition(".")
            if j.isdigit() and int(j) < len(src):
                t_key = f"{prefix}.{src[int(j)]}.{tail}"
        t_val = t_sd.get(t_key)
        if t_val is not None and t_val.shape == value.shape:
            new[key] = t_val.detach().to(value.dtype)
    student.load_state_dict(new, strict=False)
    return sum(p.numel() for name, p in student.named_parameters() if name in new)
