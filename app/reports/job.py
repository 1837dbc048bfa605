"""What a job's report page says, section by section (``job_sections``); ``html`` renders it.

Ratios are compressed ÷ original throughout (``units.RATIO_CONVENTION``). Two fields of the JSON
report are the other way round and keep their names for the clients that read them:
``size.compression_ratio`` (original ÷ artifact) and ``speed.speedup`` (original ÷ compressed
latency). The page shows neither: it shows the size ratio (artifact ÷ original bytes) and the
latency ratio (``speed.latency_ratio``) instead, so no two neighbouring figures point opposite ways.

Any section may be missing, partial, have nulls where numbers should be, or be
``{"available": false, "reason": "..."}``: the page then says so (with the reason) where the
chart and table would be, and renders the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.reports import charts, notes, units
from app.reports.view import (
    BR,
    Cell,
    Part,
    Row,
    Section,
    Table,
    badge,
    chart,
    code,
    muted,
    seq,
    sized,
    unavailable,
)

LAYER_TABLE_OPEN_MAX = 40  # the per-layer table starts folded above this many layers
PRUNING_FAMILY = "prune"  # methods named prune.* set weights to zero: their jobs get a sparsity chart

fin = units.finite


def get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def section_of(r: Mapping[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    """``(section, "")`` when it can be shown, else ``(None, why not)``."""
    sec = r.get(key)
    if sec is None:
        return None, "Not reported for this job."
    if not isinstance(sec, dict):
        return None, f"Not readable: expected an object, got {type(sec).__name__}."
    if sec.get("available") is False:
        reason = sec.get("reason")
        return None, str(reason) if reason not in (None, "") else "Not available (no reason given)."
    return sec, ""


def size_ratio(size: Any) -> float | None:
    """Artifact ÷ original bytes; from ``compression_ratio`` (its inverse) when the bytes are not there."""
    if not isinstance(size, Mapping):
        return None
    orig, art = fin(size.get("original_bytes")), fin(size.get("artifact_bytes"))
    if orig and art is not None:
        return art / orig
    inverse = fin(size.get("compression_ratio"))
    return 1 / inverse if inverse else None


def latency_ratio(speed: Mapping[str, Any]) -> float | None:
    """Compressed ÷ original median latency."""
    given = fin(speed.get("latency_ratio"))
    if given is not None:
        return given
    orig, comp = fin(get(speed, "original", "median_ms")), fin(get(speed, "compressed", "median_ms"))
    return comp / orig if orig and comp is not None else None


def pruned(r: Mapping[str, Any]) -> bool:
    """Whether a step of the job pruned (only then does a chart of zeros per layer mean something).
    A report without readable steps counts as pruned when a layer has zeros."""
    steps = r.get("steps")
    if isinstance(steps, list):
        return any(isinstance(s, Mapping) and str(s.get("method", "")).split(".")[0] == PRUNING_FAMILY for s in steps)
    layers = get(r, "sparsity", "per_layer")
    return isinstance(layers, list) and any(fin(get(x, "sparsity")) for x in layers)


def direction(higher_is_better: Any) -> str:
    return {True: "higher is better", False: "lower is better"}.get(higher_is_better, "direction unknown")


def delta(value: Any, higher_is_better: Any) -> Cell:
    """``+2.2 (worse)``: a change, coloured when its direction is known."""
    v = fin(value)
    if v is None:
        return units.text(value)
    text = units.signed(v)
    if v == 0 or higher_is_better not in (True, False):
        return text
    better = (v > 0) == higher_is_better
    return Part("better" if better else "worse", f"{text} ({'better' if better else 'worse'})")


def with_ci(value: str, sec: Mapping[str, Any], key: str, fmt: Any = units.plain) -> Cell:
    """``value (95 % CI lo – hi)`` from ``sec["ci95"][key]``, or the value alone."""
    pair = get(sec, "ci95", key)
    if not (isinstance(pair, list) and len(pair) == 2 and all(fin(x) is not None for x in pair)):
        return value
    return seq(value, " ", muted(f"(95 % CI {fmt(pair[0])} – {fmt(pair[1])})"))


def budget_rows(sec: Mapping[str, Any], counted: str) -> list[tuple[str, Cell]]:
    """How many samples (or runs) the evaluation budget allowed, and what it cost."""
    rows: list[tuple[str, Cell]] = []
    if counted == "samples" and sec.get("samples_requested") is not None:
        rows.append(
            (
                "Samples used",
                seq(
                    f"{units.count(sec.get('samples'))} of {units.count(sec.get('samples_requested'))} requested ",
                    muted(
                        f"({units.count(sec.get('samples_available'))} available; "
                        f"limited by {units.text(sec.get('limited_by'))})"
                    ),
                ),
            )
        )
    secs = sec.get("seconds")
    if isinstance(secs, dict):
        rows.append(
            (
                f"Time ({counted}: original / compressed)",
                f"{units.seconds(secs.get('original'))} / {units.seconds(secs.get('compressed'))}",
            )
        )
    budget = sec.get("budget")
    if isinstance(budget, dict) and fin(budget.get("budget_s")) is not None:
        over = budget.get("within_budget") is False
        rows.append(
            (
                "Evaluation budget",
                seq(
                    f"{units.seconds(budget.get('budget_s'))}; all measurements took "
                    f"{units.seconds(budget.get('seconds'))}",
                    muted(" (over budget)") if over else "",
                ),
            )
        )
    if sec.get("budget_note"):
        rows.append(("Budget note", notes.sentence(units.text(sec.get("budget_note")))))
    return rows


def job_sections(r: dict[str, Any]) -> list[Section]:
    """The page's sections in order; the last three only when the report has them."""
    parts = [overview(r), steps(r), size(r), sparsity(r), speed(r), memory(r), quality(r), fidelity(r)]
    extra = (export(r), stages(r), evaluation(r), notes_section(r))
    return parts + [s for s in extra if s is not None]


def overview(r: Mapping[str, Any]) -> Section:
    s = Section("Overview")
    ratio = size_ratio(r.get("size"))
    if ratio is not None:
        s.cards.append(("Size ratio (compressed ÷ original)", units.ratio(ratio)))
    art = get(r, "size", "artifact_bytes")
    if art is not None:
        s.cards.append(("Artifact size", units.size(art)))
    if pruned(r) and get(r, "sparsity", "sparsity") is not None:
        s.cards.append(("Sparsity of the pruned layers", units.percent(get(r, "sparsity", "sparsity"))))
    sp, _ = section_of(r, "speed")
    lat = latency_ratio(sp) if sp else None
    if sp and lat is not None:
        s.cards.append(("Latency ratio (compressed ÷ original)", units.ratio(lat)))
    q, _ = section_of(r, "quality")
    if q and q.get("delta") is not None:
        s.cards.append((f"{q.get('metric') or 'quality'} change", delta(q.get("delta"), q.get("higher_is_better"))))
    s.rows = [
        ("Job id", code(r.get("job_id"))),
        ("Name", units.text(r.get("job_name"))),
        ("Model id", code(r.get("model_id"))),
        ("Status", badge(r.get("status"))),
        ("Created", units.text(r.get("created_at"))),
        ("Finished", units.text(r.get("finished_at"))),
    ]
    total = get(r, "stage_seconds", "total")
    if total is not None:
        s.rows.append(("Total time", units.seconds(total)))
    return s


def _step_details(step: Mapping[str, Any]) -> Cell:
    """A step's own scalar metrics, one ``label: value`` a line."""
    extra = sorted(
        (str(k), v)
        for k, v in step.items()
        if k not in ("method", "params", "seconds", "fused_seconds") and not isinstance(v, (dict, list))
    )
    lines = [f"{k.replace('_', ' ')}: {notes.spelled(v)}" for k, v in extra] + _fallback_lines(step)
    if not lines:
        return None
    parts: list[Cell] = []
    for i, line in enumerate(lines):
        parts += [BR] if i else []
        parts.append(line)
    return seq(*parts)


def _fallback_lines(step: Mapping[str, Any]) -> list[str]:
    """Every layer that did not get the requested group size, with what it got (a quantizer's
    ``group_fallbacks``: core/methods/_ct.py), grouped by what it got; every name is listed."""
    fallbacks = step.get("group_fallbacks")
    if not isinstance(fallbacks, Mapping) or not fallbacks:
        return []
    by: dict[str, list[str]] = {}
    for name, g in fallbacks.items():
        by.setdefault("per-channel scales" if g == "channel" else f"groups of {g}", []).append(str(name))
    return [
        f"{len(names):,} layer{'s' if len(names) > 1 else ''} in {what} (group size {step.get('group_size')} "
        f"does not divide {'their' if len(names) > 1 else 'its'} input width): {', '.join(names)}"
        for what, names in by.items()
    ]


def _step_time(step: Mapping[str, Any]) -> Cell:
    if step.get("seconds") is None and fin(step.get("fused_seconds")) is not None:
        return seq(units.seconds(step["fused_seconds"]), BR, muted("one pass with the other steps"))
    return units.seconds(step.get("seconds"))


def steps(r: Mapping[str, Any]) -> Section:
    items = r.get("steps")
    if items is None:
        return unavailable("Steps", "Not reported for this job.")
    if not isinstance(items, list) or not items:
        return unavailable("Steps", "No steps recorded.")
    rows = []
    for i, step in enumerate(items, 1):
        if not isinstance(step, Mapping):
            rows.append(Row([str(i), units.text(step), None, None, None]))
            continue
        params = step.get("params")
        rows.append(
            Row(
                [
                    str(i),
                    code(step.get("method")),
                    notes.spelled(params) if params not in (None, {}) else muted("none"),
                    _step_time(step),
                    _step_details(step),
                ]
            )
        )
    head = [("#", True), ("Method", False), ("Parameters", False), ("Time", True), ("Details", False)]
    return Section("Steps", tables=[Table(head, rows)])


def size(r: Mapping[str, Any]) -> Section:
    sz, why = section_of(r, "size")
    if sz is None:
        return unavailable("Size", why)
    s = Section("Size")
    groups = [
        (label, sz.get(before), sz.get(after))
        for label, before, after in (
            ("whole model (files)", "original_bytes", "artifact_bytes"),
            ("weights (tensor data)", "original_weight_bytes", "artifact_weight_bytes"),
        )
        if fin(sz.get(before)) is not None and fin(sz.get(after)) is not None
    ]
    # A before/after chart needs both sides: a lone bar compares nothing.
    if groups:
        s.chart = chart(
            charts.before_after_bars("Size on disk", groups, kind="bytes", names=("original", "compressed"))
        )
    else:
        s.chart_reason = "The original's and the compressed model's sizes are not both known."
    params = sz.get("parameters") if isinstance(sz.get("parameters"), dict) else {}
    s.rows = [
        ("Original model", sized(sz.get("original_bytes"))),
        ("Compressed model (artifact)", sized(sz.get("artifact_bytes"))),
        ("Size ratio (compressed ÷ original)", units.ratio(size_ratio(sz))),
        ("Original weights (tensor data)", sized(sz.get("original_weight_bytes"))),
        ("Compressed weights (tensor data)", sized(sz.get("artifact_weight_bytes"))),
        ("Weights ratio (compressed ÷ original)", units.ratio(sz.get("weight_bytes_ratio"))),
        ("In memory once loaded", sized(sz.get("memory_bytes"))),
        ("Parameters, original", units.count(params.get("original"))),
        ("Parameters, compressed", units.count(params.get("total"))),
        ("Parameters, non-zero", units.count(params.get("nonzero"))),
        ("Mean bits per weight", units.plain(sz.get("mean_bits_per_weight"), 3)),
    ]
    return s


def sparsity(r: Mapping[str, Any]) -> Section:
    sp, why = section_of(r, "sparsity")
    if sp is None:
        return unavailable("Sparsity", why)
    s = Section("Sparsity")
    s.rows = [
        ("Overall (all parameters)", units.percent(sp.get("overall"))),
        ("Pruned layers: sparsity", units.percent(sp.get("sparsity"))),
        ("Pruned layers: parameters", units.count(sp.get("target_parameters"))),
        ("Pruned layers: zeros", units.count(sp.get("target_zeros"))),
    ]
    per_layer = sp.get("per_layer")
    layers = [x for x in per_layer if isinstance(x, dict)] if isinstance(per_layer, list) else []
    did_prune = pruned(r)
    if not did_prune:
        # Zeros a quantizer or the original left are no result of this job: no chart of them.
        s.paragraphs.append("No step of this job pruned weights, so there is no sparsity chart.")
    elif not layers:
        s.chart_reason = "No per-layer figures were reported."
    elif all(fin(x.get("sparsity")) is None for x in layers):
        s.chart_reason = "No layer has a sparsity value."
    elif not any(fin(x.get("sparsity")) for x in layers):
        # prune.structured removes rows and heads: its layers are smaller, not sparse.
        s.chart_reason = "No layer has zero weights: the pruning removed weights instead of zeroing them."
    else:
        s.chart = chart(
            charts.layer_sparsity_bars(
                [(str(x.get("name")), x.get("sparsity")) for x in layers], overall=sp.get("overall")
            )
        )
    if layers:
        head = [("#", True), ("Layer", False), ("Parameters", True), ("Zeros", True), ("Sparsity", True)]
        rows = [
            Row(
                [
                    str(i),
                    code(x.get("name")),
                    units.count(x.get("parameters")),
                    units.count(x.get("zeros")),
                    units.percent(x.get("sparsity")),
                ]
            )
            for i, x in enumerate(layers, 1)
        ]
        summary = f"All {len(layers):,} layers" if len(layers) != 1 else "The one layer"
        opened = did_prune and len(layers) <= LAYER_TABLE_OPEN_MAX
        s.tables.append(Table(head, rows, summary=summary, open=opened))
    return s


def _latency_claim(sp: Mapping[str, Any], s: Section) -> None:
    """The latency ratio in words, or why no speed-up is claimed."""
    lat = latency_ratio(sp)
    if fin(sp.get("speedup")) is not None and lat is not None:
        change = abs(1 - lat)
        how = "less" if lat < 1 else "more"
        s.paragraphs.append(
            seq(
                "The compressed model's median latency is ",
                Part("strong", f"{units.ratio(lat)} the original's"),
                f" ({units.percent(change)} {how} time per pass)." if lat != 1 else " (the same time per pass).",
            )
        )
        return
    if sp.get("runs_as") == "decompressed":
        why_not = (
            "the compressed model runs decompressed, with the same dense kernels as the original, so "
            "its latency is no evidence of a speed-up"
        )
    else:
        why_not = "the worker claims none" + ("; the note below says why" if sp.get("note") else "")
    s.callouts.append(("No speed-up claimed", why_not + ". Both latencies are shown for reference."))


def speed(r: Mapping[str, Any]) -> Section:
    sp, why = section_of(r, "speed")
    if sp is None:
        return unavailable("Speed", why)
    s = Section("Speed")
    _latency_claim(sp, s)
    s.notes = notes.note_sentences(sp.get("note")) + notes.note_sentences(sp.get("notes"))
    orig, comp = sp.get("original"), sp.get("compressed")
    b, a = fin(get(orig, "median_ms")), fin(get(comp, "median_ms"))
    if b is not None and a is not None:
        s.chart = chart(
            charts.before_after_bars(
                "Latency (median; whiskers: min to max)",
                [("median latency", b, a)],
                kind="ms",
                axis_label="time per pass",
                ranges=[(_range(orig), _range(comp))],
            )
        )
    else:
        s.chart_reason = "The latency of both models was not measured."
    s.rows = _speed_rows(sp)
    s.tables.append(_latency_table(orig, comp, sp.get("decompressed")))
    return s


def _range(run: Any) -> tuple[float, float] | None:
    lo, hi = fin(get(run, "min_ms")), fin(get(run, "max_ms"))
    return (lo, hi) if lo is not None and hi is not None else None


def _speed_rows(sp: Mapping[str, Any]) -> list[tuple[str, Cell]]:
    """How the latency was measured, and the ratio."""
    runs: Cell = f"{units.count(sp.get('runs'))} (after {units.count(sp.get('warmup'))} warm-up)"
    if sp.get("runs_requested") is not None:
        runs = seq(
            runs,
            " ",
            muted(
                f"of {units.count(sp.get('runs_requested'))} ({units.count(sp.get('warmup_requested'))}) "
                f"requested; limited by {units.text(sp.get('limited_by'))}"
            ),
        )
    return [
        ("Runs as", code(sp.get("runs_as"))),
        ("Kernel", units.text(sp.get("kernel"))),
        ("Device", units.text(sp.get("device"))),
        ("Threads", units.count(sp.get("threads"))),
        ("Batch size × sequence length", f"{units.count(sp.get('batch_size'))} × {units.count(sp.get('seq_len'))}"),
        ("Timed runs", runs),
        ("Latency ratio (compressed ÷ original)", units.ratio(latency_ratio(sp))),
        *budget_rows(sp, "latency"),
    ]


def _latency_table(orig: Any, comp: Any, decompressed: Any = None) -> Table:
    """Median, min, max and every sample of each model's latency (and of the compressed model as
    transformers runs it, where the timed one ran other kernels)."""
    head = [("Model", False), ("Median", True), ("Min", True), ("Max", True), ("Every run", False)]
    rows = []
    runs = [("original", orig), ("compressed", comp)]
    if isinstance(decompressed, dict):
        runs.append(("compressed, as transformers runs it (decompressed)", decompressed))
    for label, run in runs:
        run = run if isinstance(run, dict) else {}
        samples = run.get("samples_ms")
        every = ", ".join(units.millis(x) for x in samples) if isinstance(samples, list) and samples else None
        rows.append(
            Row(
                [
                    label,
                    units.millis(run.get("median_ms")),
                    units.millis(run.get("min_ms")),
                    units.millis(run.get("max_ms")),
                    every,
                ]
            )
        )
    return Table(head, rows)


def memory(r: Mapping[str, Any]) -> Section:
    mem, why = section_of(r, "memory")
    if mem is None:
        return unavailable("Peak memory", why)
    cuda = mem.get("peak_cuda_bytes")
    return Section(
        "Peak memory",
        rows=[
            ("Peak resident memory (RSS)", sized(mem.get("peak_rss_bytes"))),
            ("Peak CUDA memory", sized(cuda) if cuda is not None else muted("not measured (no GPU used)")),
            ("How it was measured", units.text(mem.get("how"))),
        ],
    )


def quality(r: Mapping[str, Any]) -> Section:
    q, why = section_of(r, "quality")
    if q is None:
        return unavailable("Quality", why)
    s = Section("Quality")
    metric = q.get("metric") if isinstance(q.get("metric"), str) and q.get("metric") else "quality"
    hib = q.get("higher_is_better")
    if fin(q.get("original")) is not None and fin(q.get("compressed")) is not None:
        s.chart = chart(
            charts.before_after_bars(
                f"{metric} ({direction(hib)})",
                [(metric, q.get("original"), q.get("compressed"))],
                kind="number",
                axis_label=metric,
            )
        )
    else:
        s.chart_reason = "The metric is not known for both models."
    ds = q.get("dataset") if isinstance(q.get("dataset"), dict) else {}
    s.rows = [
        ("Metric", seq(metric, " ", muted(f"({direction(hib)})"))),
        ("Original", with_ci(units.plain(q.get("original"), 6), q, "original")),
        ("Compressed", with_ci(units.plain(q.get("compressed"), 6), q, "compressed")),
        ("Change (compressed − original)", delta(q.get("delta"), hib)),
    ]
    if q.get("ratio") is not None:
        s.rows.append(("Ratio (compressed ÷ original)", with_ci(units.ratio(q.get("ratio")), q, "ratio")))
    s.rows += [
        ("Dataset", seq(units.text(ds.get("source")), " ", code(ds.get("id"))) if ds.get("id") else ds.get("source")),
        ("Samples / tokens", f"{units.count(ds.get('samples'))} / {units.count(ds.get('tokens'))}"),
        *budget_rows(q, "samples"),
        *([("Confidence intervals", units.text(q.get("ci_method")))] if q.get("ci_method") else []),
    ]
    if q.get("ci_reason"):
        s.notes.append(notes.sentence(units.text(q.get("ci_reason"))))
    return s


def fidelity(r: Mapping[str, Any]) -> Section:
    f, why = section_of(r, "fidelity")
    if f is None:
        return unavailable("Fidelity to the original", why)
    reasons = f.get("reasons") if isinstance(f.get("reasons"), dict) else {}

    def cell(key: str, fmt: Any) -> Cell:
        if f.get(key) is None:
            return seq("— ", muted(units.text(reasons.get(key)) if reasons.get(key) else "not measured"))
        return with_ci(fmt(f.get(key)), f, key, fmt)

    rows: list[tuple[str, Cell]] = [
        ("Compared on", units.text(f.get("on"))),
        ("Samples / tokens", f"{units.count(f.get('samples'))} / {units.count(f.get('tokens'))}"),
        ("Mean KL divergence (lower is better)", cell("kl_mean", units.plain)),
        ("Top-1 agreement (higher is better)", cell("top1_agreement", units.percent)),
        ("Output cosine similarity (higher is better)", cell("output_cosine", lambda v: units.plain(v, 6))),
        *budget_rows({k: v for k, v in f.items() if k != "budget"}, "samples"),
        *([("Confidence intervals", units.text(f.get("ci_method")))] if f.get("ci_method") else []),
    ]
    shown = {"kl_mean", "top1_agreement", "output_cosine"}
    rows += [
        (f"Why {str(k).replace('_', ' ')} is missing", units.text(v))
        for k, v in sorted(reasons.items(), key=lambda kv: str(kv[0]))
        if k not in shown and v
    ]
    return Section("Fidelity to the original", rows=rows)


# The export section's keys in the order a reader wants them, with their labels; others follow.
_EXPORT_ROWS = (
    ("format", "Format"),
    ("gguf_type", "GGUF tensor type"),
    ("quantize", "ONNX quantization"),
    ("reduce_range", "ONNX int8 weights in 7 bits"),
    ("file", "File"),
    ("files", "Files"),
    ("bytes", "Bytes"),
    ("exact", "Exact (no second rounding)"),
    ("inexact_tensors", "Tensors not exact"),
    ("opset", "ONNX opset"),
    ("seconds", "Conversion time"),
    ("total_seconds", "Export stage time"),
)


def export(r: Mapping[str, Any]) -> Section | None:
    """The output format's conversion (gguf, onnx): what was written and how long it took."""
    ex = r.get("export")
    if not isinstance(ex, dict) or not ex:
        return None
    rows: list[tuple[str, Cell]] = []
    seen = set()
    for key, label in _EXPORT_ROWS:
        if key in ex:
            seen.add(key)
            if key == "reduce_range" and ex[key] is None:  # a float32 export: nothing to say
                continue
            v = ex[key]
            if key == "bytes":
                rows.append((label, units.size(v)))
            else:
                rows.append((label, units.seconds(v) if key.endswith("seconds") else notes.spelled(v)))
    rows += [(str(k), notes.spelled(v)) for k, v in ex.items() if k not in seen and not isinstance(v, dict)]
    return Section("Export", rows=rows)


def stages(r: Mapping[str, Any]) -> Section | None:
    st = r.get("stage_seconds")
    if not isinstance(st, dict) or not st:
        return None
    rows = [Row([code(k), units.seconds(v)]) for k, v in st.items()]
    return Section("Time per stage", tables=[Table([("Stage", False), ("Time", True)], rows)])


def evaluation(r: Mapping[str, Any]) -> Section | None:
    ev = r.get("evaluation")
    if not isinstance(ev, dict) or not ev:
        return None
    # The spec's own field names: what a user changes in the next job's `evaluation`.
    return Section("Evaluation settings", rows=[(str(k), notes.spelled(v)) for k, v in ev.items()])


def notes_section(r: Mapping[str, Any]) -> Section | None:
    """How the artifact is stored and runs, and how the job built it: sentences, or no section."""
    items = notes.note_sentences(r.get("notes"))
    built = notes.engine_sentence(r.get("engine"))
    items += [built] if built else []
    return Section("Notes", items=items) if items else None
