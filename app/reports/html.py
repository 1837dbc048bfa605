"""Standalone HTML pages for a job's report and for a sweep.

``render_job_report(report)`` and ``render_sweep(sweep)`` are pure: a dict in (the JSON of
``GET /v1/jobs/{id}/report`` and ``GET /v1/sweeps/{id}``), a complete HTML5 document out. A page
has inline CSS and inline SVG charts only: no script, no external resource (not even a favicon
request), and it carries its own Content-Security-Policy (``PAGE_CSP``) in a ``<meta>`` element.

Every string taken from the input is escaped. Any section may be missing, partial, have nulls
where numbers should be, or be ``{"available": false, "reason": "..."}``: the page then says so
(with the reason) where the chart and table would be, and renders the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from app.reports import charts

PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
"""What the pages need: inline ``<style>`` and the SVGs' style attributes, and the empty ``data:``
favicon. Serve the pages with this header (plus ``frame-ancestors 'none'``, which a ``<meta>``
cannot carry)."""

DASH = "—"
LAYER_TABLE_OPEN_MAX = 40  # the per-layer table starts folded above this many layers

_STATUSES = {"queued", "running", "succeeded", "failed", "canceled", "partial"}

_CSS = """
:root { color-scheme: light; --fg: #1d232b; --muted: #5f6b7a; --line: #dde2e8; --bg: #ffffff;
  --soft: #f5f7f9; --accent: #2f6db5; --bad: #b3261e; --good: #1e7a3a; --front: #fdf1f2; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 1.55rem; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 18px 0 6px; }
p { margin: 6px 0; }
.sub { color: var(--muted); margin: 0 0 16px; }
.muted { color: var(--muted); }
.reason { background: var(--soft); border-left: 4px solid #b7c0cc; padding: 8px 12px; margin: 8px 0;
  color: var(--fg); overflow-wrap: anywhere; }
.reason b { font-weight: 600; }
.note { background: #fff8e6; border-left: 4px solid #e0a800; padding: 8px 12px; margin: 8px 0;
  overflow-wrap: anywhere; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0 0; padding: 0; list-style: none; }
.cards li { flex: 1 1 170px; background: var(--soft); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 12px; }
.cards .k { display: block; color: var(--muted); font-size: .8rem; }
.cards .v { display: block; font-size: 1.2rem; font-weight: 600; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; margin: 8px 0; font-size: .9rem; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; }
table.dense { font-size: .82rem; }
table.dense th, table.dense td { padding: 4px 7px; }
tr.error td { border-top: none; padding-top: 0; color: var(--bad); }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { font-weight: 500; color: var(--muted); white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
.wrap { overflow-wrap: break-word; }
table.kv td.wrap { overflow-wrap: anywhere; }
.nowrap { white-space: nowrap; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; }
pre { background: var(--soft); border: 1px solid var(--line); padding: 10px; overflow-x: auto;
  white-space: pre-wrap; overflow-wrap: anywhere; }
.exact { color: var(--muted); font-size: .8rem; }
.badge { display: inline-block; white-space: nowrap; padding: 1px 9px; border-radius: 10px; font-size: .8rem;
  font-weight: 600;
  background: #e8ebef; color: #39424e; }
.badge.succeeded { background: #dff3e4; color: var(--good); }
.badge.failed { background: #fbe4e2; color: var(--bad); }
.badge.running, .badge.queued { background: #e3edf9; color: var(--accent); }
.badge.partial { background: #fff1cc; color: #7a5a00; }
.better { color: var(--good); }
.worse { color: var(--bad); }
figure { margin: 10px 0; }
svg.chart { display: block; max-width: 100%; height: auto; }
tr.frontier td { background: var(--front) !important; }
tr.frontier td:first-child { font-weight: 700; }
.star { color: #d1495b; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: .8rem; }
"""


# --- formatting -------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Any value as escaped text; None as a dash."""
    if value is None:
        return DASH
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return escape(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str))
    return escape(str(value))


def _n(value: Any) -> float | None:
    """A real finite number, or None (bools, strings and NaN are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, spec: str = ".4g", suffix: str = "") -> str:
    v = _n(value)
    if v is None:
        return _e(value)
    return escape(f"{v:{spec}}{suffix}")


def _int(value: Any) -> str:
    v = _n(value)
    if v is None:
        return _e(value)
    return f"{v:,.0f}" if v == int(v) else escape(f"{v:,.4g}")


def _bytes(value: Any, *, stacked: bool = False) -> str:
    """``1.23 MB (1,234,567 bytes)``; ``stacked`` puts the exact count on a second line."""
    v = _n(value)
    if v is None:
        return _e(value)
    return f'{escape(charts.human_bytes(v))}{"<br>" if stacked else " "}<span class="exact">({_int(v)} bytes)</span>'


def _pct(value: Any) -> str:
    v = _n(value)
    return _e(value) if v is None else f"{v * 100:.2f} %"


def _ratio(value: Any) -> str:
    v = _n(value)
    return _e(value) if v is None else f"{v:.3g}×"


def _ms(value: Any) -> str:
    v = _n(value)
    return _e(value) if v is None else f"{v:.4g} ms"


def _secs(value: Any) -> str:
    v = _n(value)
    return _e(value) if v is None else f"{v:.3f} s"


def _ci(sec: Mapping[str, Any], key: str, spec: str) -> str:
    """`` <span>(95 % CI lo – hi)</span>`` from ``sec["ci95"][key]``, or nothing."""
    ci = sec.get("ci95")
    pair = ci.get(key) if isinstance(ci, dict) else None
    if not (isinstance(pair, list) and len(pair) == 2 and all(_n(x) is not None for x in pair)):
        return ""
    return f' <span class="muted">(95 % CI {_fmt(pair[0], spec)} – {_fmt(pair[1], spec)})</span>'


def _budget_rows(sec: Mapping[str, Any], counted: str) -> list[tuple[str, str]]:
    """How many samples (or runs) the evaluation budget allowed, and what it cost."""
    rows: list[tuple[str, str]] = []
    if counted == "samples" and sec.get("samples_requested") is not None:
        rows.append(
            (
                "Samples used",
                f"{_int(sec.get('samples'))} of {_int(sec.get('samples_requested'))} requested "
                f'<span class="muted">({_int(sec.get("samples_available"))} available; limited by '
                f"{_e(sec.get('limited_by'))})</span>",
            )
        )
    seconds = sec.get("seconds")
    if isinstance(seconds, dict):
        rows.append(
            (
                f"Seconds ({counted}: original / compressed)",
                f"{_secs(seconds.get('original'))} / {_secs(seconds.get('compressed'))}",
            )
        )
    budget = sec.get("budget")
    if isinstance(budget, dict) and _n(budget.get("budget_s")) is not None:
        within = budget.get("within_budget")
        rows.append(
            (
                "Evaluation budget",
                f"{_secs(budget.get('budget_s'))}; all measurements took "
                f"{_secs(budget.get('seconds'))}"
                + ("" if within is not False else ' <span class="muted">(over budget)</span>'),
            )
        )
    if sec.get("budget_note"):
        rows.append(("Budget note", _e(sec.get("budget_note"))))
    return rows


def _section(data: Mapping[str, Any], key: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(section, None)`` when it can be shown, else ``(None, why not)``."""
    sec = data.get(key)
    if sec is None:
        return None, "Not reported for this job."
    if not isinstance(sec, dict):
        return None, f"Not readable: expected an object, got {type(sec).__name__}."
    if sec.get("available") is False:
        reason = sec.get("reason")
        return None, str(reason) if reason not in (None, "") else "Not available (no reason given)."
    return sec, None


def _reason(text: str, what: str = "Not available") -> str:
    return f'<p class="reason"><b>{escape(what)}:</b> {escape(text)}</p>'


def _kv(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table; labels are escaped here, values must already be HTML."""
    body = "".join(f'<tr><th scope="row">{escape(k)}</th><td class="wrap">{v}</td></tr>' for k, v in rows)
    return f'<div class="scroll"><table class="kv"><tbody>{body}</tbody></table></div>' if body else ""


def _table(head: list[tuple[str, bool]], rows: Iterable[str], cls: str = "") -> str:
    """``head`` is ``(label, numeric)``; ``rows`` are ready ``<tr>`` strings."""
    th = "".join(
        f'<th scope="col"{" class=num" if num else ""}>{escape(h).replace(".", ".<wbr>")}</th>' for h, num in head
    )
    attr = f' class="{cls}"' if cls else ""
    return f'<div class="scroll"><table{attr}><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _td(html_value: str, num: bool = False) -> str:
    return f'<td class="num">{html_value}</td>' if num else f'<td class="wrap">{html_value}</td>'


def _code(value: Any) -> str:
    return f"<code>{_e(value)}</code>"


def _badge(status: Any) -> str:
    cls = status if isinstance(status, str) and status in _STATUSES else "other"
    return f'<span class="badge {cls}">{_e(status)}</span>'


def _figure(svg: str) -> str:
    return f"<figure>{svg}</figure>"


def _json_block(value: Any) -> str:
    return f"<pre>{escape(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str))}</pre>"


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(PAGE_CSP)}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n"
        "<footer>Generated by modelpress. Numbers are as the worker measured them; sizes use "
        "decimal units (1 MB = 1,000,000 bytes).</footer>\n</main>\n</body>\n</html>\n"
    )


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def _direction(higher_is_better: Any) -> str:
    if higher_is_better is True:
        return "higher is better"
    if higher_is_better is False:
        return "lower is better"
    return "direction unknown"


def _delta_html(delta: Any, higher_is_better: Any) -> str:
    v = _n(delta)
    if v is None:
        return _e(delta)
    text = f"{v:+.4g}"
    if v == 0 or higher_is_better not in (True, False):
        return text
    better = (v > 0) == higher_is_better
    return f'<span class="{"better" if better else "worse"}">{text} ({"better" if better else "worse"})</span>'


# --- job report -------------------------------------------------------------------------------


def render_job_report(report: dict) -> str:
    """The job's report (``GET /v1/jobs/{id}/report``) as a standalone HTML page."""
    report = report if isinstance(report, dict) else {}
    name = report.get("job_name")
    ident = name if isinstance(name, str) and name else report.get("job_id") or "unknown job"
    parts = [
        f"<h1>Job report: {_e(ident)}</h1>",
        f'<p class="sub">{_badge(report.get("status"))} model {_e(report.get("model_id"))}</p>',
        _job_overview(report),
        _job_steps(report),
        _job_size(report),
        _job_sparsity(report),
        _job_speed(report),
        _job_memory(report),
        _job_quality(report),
        _job_fidelity(report),
        _job_stages(report),
        _job_evaluation(report),
        _job_notes(report),
    ]
    return _document(f"Job report: {ident}", "\n".join(p for p in parts if p))


def _job_overview(r: dict) -> str:
    cards = []
    ratio = _get(r, "size", "compression_ratio")
    if ratio is not None:
        cards.append(("Compression (original ÷ artifact)", _ratio(ratio)))
    art = _get(r, "size", "artifact_bytes")
    if art is not None:
        cards.append(("Artifact size", escape(charts.human_bytes(art)) if _n(art) is not None else _e(art)))
    overall = _get(r, "sparsity", "overall")
    if overall is not None:
        cards.append(("Overall sparsity", _pct(overall)))
    speed = r.get("speed")
    if isinstance(speed, dict) and speed.get("available") is not False:
        if _n(speed.get("speedup")) is not None:
            cards.append(("Speed-up", _ratio(speed["speedup"])))
        elif speed.get("runs_as") == "decompressed":
            cards.append(("Speed-up", "none claimed (runs decompressed)"))
    quality = r.get("quality")
    if isinstance(quality, dict) and quality.get("available") is not False and quality.get("delta") is not None:
        cards.append(
            (
                f"{quality.get('metric') or 'quality'} change",
                _delta_html(quality.get("delta"), quality.get("higher_is_better")),
            )
        )
    card_html = "".join(f'<li><span class="k">{escape(k)}</span><span class="v">{v}</span></li>' for k, v in cards)
    rows = [
        ("Job id", _code(r.get("job_id"))),
        ("Name", _e(r.get("job_name"))),
        ("Model id", _code(r.get("model_id"))),
        ("Status", _badge(r.get("status"))),
        ("Created", _e(r.get("created_at"))),
        ("Finished", _e(r.get("finished_at"))),
    ]
    total = _get(r, "stage_seconds", "total")
    if total is not None:
        rows.append(("Total time", _secs(total)))
    return "<h2>Overview</h2>" + (f'<ul class="cards">{card_html}</ul>' if card_html else "") + _kv(rows)


def _job_steps(r: dict) -> str:
    steps = r.get("steps")
    if steps is None:
        return "<h2>Steps</h2>" + _reason("Not reported for this job.")
    if not isinstance(steps, list) or not steps:
        return "<h2>Steps</h2>" + _reason("No steps recorded.")
    rows = []
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict):
            rows.append(f"<tr>{_td(str(i), True)}{_td(_e(step))}{_td(DASH)}{_td(DASH, True)}{_td(DASH)}</tr>")
            continue
        params = step.get("params")
        params_html = _code(params) if params not in (None, {}) else '<span class="muted">none</span>'
        extra = {
            k: v
            for k, v in step.items()
            if k not in ("method", "params", "seconds") and not isinstance(v, (dict, list))
        }
        extra_html = (
            "<br>".join(f"{escape(str(k))}: {_e(v)}" for k, v in sorted(extra.items(), key=lambda kv: str(kv[0])))
            or DASH
        )
        rows.append(
            f"<tr>{_td(str(i), True)}{_td(_code(step.get('method')))}{_td(params_html)}"
            f"{_td(_secs(step.get('seconds')), True)}{_td(extra_html)}</tr>"
        )
    head = [("#", True), ("Method", False), ("Parameters", False), ("Time", True), ("Details", False)]
    return "<h2>Steps</h2>" + _table(head, rows)


def _job_size(r: dict) -> str:
    size, why = _section(r, "size")
    if size is None:
        return "<h2>Size</h2>" + _reason(why or "")
    groups = []
    if size.get("original_bytes") is not None or size.get("artifact_bytes") is not None:
        groups.append(("whole model (files)", size.get("original_bytes"), size.get("artifact_bytes")))
    if size.get("original_weight_bytes") is not None or size.get("artifact_weight_bytes") is not None:
        groups.append(("weights (tensor data)", size.get("original_weight_bytes"), size.get("artifact_weight_bytes")))
    chart = ""
    if any(_n(b) is not None or _n(a) is not None for _, b, a in groups):
        chart = _figure(
            charts.before_after_bars(
                "Size on disk", groups, kind="bytes", axis_label="bytes", names=("original", "artifact")
            )
        )
    else:
        chart = _reason("No byte counts were reported.", "No chart")
    params = size.get("parameters") if isinstance(size.get("parameters"), dict) else {}
    rows = [
        ("Original model", _bytes(size.get("original_bytes"))),
        ("Artifact", _bytes(size.get("artifact_bytes"))),
        ("Compression ratio (original ÷ artifact)", _ratio(size.get("compression_ratio"))),
        ("Original weights (tensor data)", _bytes(size.get("original_weight_bytes"))),
        ("Artifact weights (tensor data)", _bytes(size.get("artifact_weight_bytes"))),
        ("Weight bytes ratio (artifact ÷ original)", _fmt(size.get("weight_bytes_ratio"))),
        ("In memory once loaded", _bytes(size.get("memory_bytes"))),
        ("Parameters, original", _int(params.get("original"))),
        ("Parameters, result", _int(params.get("total"))),
        ("Parameters, non-zero", _int(params.get("nonzero"))),
        ("Mean bits per weight", _fmt(size.get("mean_bits_per_weight"))),
    ]
    return "<h2>Size</h2>" + chart + _kv(rows)


def _job_sparsity(r: dict) -> str:
    sp, why = _section(r, "sparsity")
    if sp is None:
        return "<h2>Sparsity</h2>" + _reason(why or "")
    rows = [
        ("Overall (all parameters)", _pct(sp.get("overall"))),
        ("Pruned tensors: sparsity", _pct(sp.get("sparsity"))),
        ("Pruned tensors: parameters", _int(sp.get("target_parameters"))),
        ("Pruned tensors: zeros", _int(sp.get("target_zeros"))),
    ]
    per_layer = sp.get("per_layer")
    layers = [x for x in per_layer if isinstance(x, dict)] if isinstance(per_layer, list) else []
    if not layers:
        return "<h2>Sparsity</h2>" + _kv(rows) + _reason("No per-layer figures were reported.", "No chart")
    if any(_n(x.get("sparsity")) is not None for x in layers):
        chart = _figure(
            charts.layer_sparsity_bars(
                [(str(x.get("name")), x.get("sparsity")) for x in layers], overall=sp.get("overall")
            )
        )
    else:
        chart = _reason("No layer has a sparsity value.", "No chart")
    head = [("#", True), ("Layer", False), ("Parameters", True), ("Zeros", True), ("Sparsity", True)]
    trs = (
        f"<tr>{_td(str(i), True)}{_td(_code(x.get('name')))}{_td(_int(x.get('parameters')), True)}"
        f"{_td(_int(x.get('zeros')), True)}{_td(_pct(x.get('sparsity')), True)}</tr>"
        for i, x in enumerate(layers, 1)
    )
    opened = " open" if len(layers) <= LAYER_TABLE_OPEN_MAX else ""
    count = f"All {len(layers)} layers" if len(layers) != 1 else "The one layer"
    table = f"<details{opened}><summary>{count}</summary>{_table(head, trs)}</details>"
    return "<h2>Sparsity</h2>" + _kv(rows) + chart + table


def _latency_group(run: Any) -> tuple[float | None, tuple[float, float] | None]:
    if not isinstance(run, dict):
        return None, None
    lo, hi = _n(run.get("min_ms")), _n(run.get("max_ms"))
    return run.get("median_ms"), (lo, hi) if lo is not None and hi is not None else None


def _job_speed(r: dict) -> str:
    sp, why = _section(r, "speed")
    if sp is None:
        return "<h2>Speed</h2>" + _reason(why or "")
    orig, comp = sp.get("original"), sp.get("compressed")
    chart = _latency_chart(orig, comp)
    parts = ["<h2>Speed</h2>", _speedup_claim(sp)]
    if sp.get("note"):
        parts.append(f'<p class="note">{_e(sp.get("note"))}</p>')
    parts.append(chart)
    parts.append(_kv(_speed_rows(sp)))
    parts.append(_latency_table(orig, comp))
    return "".join(parts)


def _latency_chart(orig: Any, comp: Any) -> str:
    (b, b_rng), (a, a_rng) = _latency_group(orig), _latency_group(comp)
    if _n(b) is None and _n(a) is None:
        return _reason("No latency was measured.", "No chart")
    return _figure(
        charts.before_after_bars(
            "Latency (median; whiskers: min to max)",
            [("median latency", b, a)],
            kind="ms",
            axis_label="ms",
            ranges=[(b_rng, a_rng)],
        )
    )


def _speedup_claim(sp: dict) -> str:
    """The speed-up, or why none is claimed."""
    speedup = _n(sp.get("speedup"))
    if speedup is not None:
        return (
            f"<p>The compressed model ran <b>{speedup:.3g}× as fast</b> as the original "
            f"(latency ratio {_fmt(sp.get('latency_ratio'), '.3g')}).</p>"
        )
    why_not = (
        "the compressed model runs decompressed, with the same dense kernels as the original, so "
        "its latency is no evidence of a speed-up"
        if sp.get("runs_as") == "decompressed"
        else "the worker reported none"
    )
    return _reason(why_not + ". Both latencies are shown for reference.", "No speed-up claimed")


def _speed_rows(sp: dict) -> list[tuple[str, str]]:
    """How the latency was measured, and the ratios."""
    return [
        ("Runs as", _code(sp.get("runs_as"))),
        ("Kernel", _e(sp.get("kernel"))),
        ("Device", _e(sp.get("device"))),
        ("Threads", _e(sp.get("threads"))),
        ("Batch size × sequence length", f"{_e(sp.get('batch_size'))} × {_e(sp.get('seq_len'))}"),
        (
            "Timed runs (after warm-up runs)",
            f"{_e(sp.get('runs'))} (after {_e(sp.get('warmup'))})"
            + (
                f' <span class="muted">of {_e(sp.get("runs_requested"))} ({_e(sp.get("warmup_requested"))}) requested; '
                f"limited by {_e(sp.get('limited_by'))}</span>"
                if sp.get("runs_requested") is not None
                else ""
            ),
        ),
        ("Latency ratio (compressed ÷ original)", _fmt(sp.get("latency_ratio"), ".4g")),
        ("Speed-up", _ratio(sp.get("speedup"))),
        *_budget_rows(sp, "latency"),
    ]


def _latency_table(orig: Any, comp: Any) -> str:
    """Median, min, max and every sample of each model's latency."""
    head = [("Model", False), ("Median", True), ("Min", True), ("Max", True), ("Samples (ms)", False)]
    trs = []
    for label, run in (("original", orig), ("compressed", comp)):
        run = run if isinstance(run, dict) else {}
        samples = run.get("samples_ms")
        samples_html = (
            ", ".join(_fmt(s, ".4g") for s in samples) if isinstance(samples, list) and samples else _e(samples)
        )
        trs.append(
            f"<tr>{_td(label)}{_td(_ms(run.get('median_ms')), True)}{_td(_ms(run.get('min_ms')), True)}"
            f"{_td(_ms(run.get('max_ms')), True)}{_td(samples_html)}</tr>"
        )
    return _table(head, trs)


def _job_memory(r: dict) -> str:
    mem, why = _section(r, "memory")
    if mem is None:
        return "<h2>Peak memory</h2>" + _reason(why or "")
    rows = [
        ("Peak resident memory (RSS)", _bytes(mem.get("peak_rss_bytes"))),
        (
            "Peak CUDA memory",
            _bytes(mem.get("peak_cuda_bytes"))
            if mem.get("peak_cuda_bytes") is not None
            else '<span class="muted">not measured (no GPU used)</span>',
        ),
        ("How it was measured", _e(mem.get("how"))),
    ]
    return "<h2>Peak memory</h2>" + _kv(rows)


def _job_quality(r: dict) -> str:
    q, why = _section(r, "quality")
    if q is None:
        return "<h2>Quality</h2>" + _reason(why or "")
    metric = q.get("metric") if isinstance(q.get("metric"), str) and q.get("metric") else "quality"
    hib = q.get("higher_is_better")
    parts = ["<h2>Quality</h2>"]
    if _n(q.get("original")) is not None or _n(q.get("compressed")) is not None:
        parts.append(
            _figure(
                charts.before_after_bars(
                    f"{metric} ({_direction(hib)})",
                    [(metric, q.get("original"), q.get("compressed"))],
                    kind="number",
                    axis_label=metric,
                )
            )
        )
    else:
        parts.append(_reason("No quality values were reported.", "No chart"))
    ds = q.get("dataset") if isinstance(q.get("dataset"), dict) else {}
    ds_text = f"{_e(ds.get('source'))}"
    if ds.get("id"):
        ds_text += f" <code>{_e(ds.get('id'))}</code>"
    rows = [
        ("Metric", f'{_e(metric)} <span class="muted">({_direction(hib)})</span>'),
        ("Original", _fmt(q.get("original"), ".6g") + _ci(q, "original", ".4g")),
        ("Compressed", _fmt(q.get("compressed"), ".6g") + _ci(q, "compressed", ".4g")),
        ("Change (compressed − original)", _delta_html(q.get("delta"), hib)),
        *(
            [("Ratio (compressed ÷ original)", _fmt(q.get("ratio"), ".4g") + _ci(q, "ratio", ".4g"))]
            if q.get("ratio") is not None
            else []
        ),
        ("Dataset", ds_text),
        ("Samples / tokens", f"{_int(ds.get('samples'))} / {_int(ds.get('tokens'))}"),
        *_budget_rows(q, "samples"),
        *([("Confidence intervals", _e(q.get("ci_method")))] if q.get("ci_method") else []),
    ]
    parts.append(_kv(rows))
    return "".join(parts)


def _job_fidelity(r: dict) -> str:
    f, why = _section(r, "fidelity")
    if f is None:
        return "<h2>Fidelity to the original</h2>" + _reason(why or "")
    reasons = f.get("reasons") if isinstance(f.get("reasons"), dict) else {}

    def cell(key: str, spec: str) -> str:
        if f.get(key) is None:
            why_null = reasons.get(key)
            return f'{DASH} <span class="muted">{_e(why_null) if why_null else "not measured"}</span>'
        return _fmt(f.get(key), spec)

    rows = [
        ("Compared on", _e(f.get("on"))),
        ("Samples / tokens", f"{_int(f.get('samples'))} / {_int(f.get('tokens'))}"),
        ("Mean KL divergence (lower is better)", cell("kl_mean", ".4g") + _ci(f, "kl_mean", ".4g")),
        ("Top-1 agreement (higher is better)", cell("top1_agreement", ".4g") + _ci(f, "top1_agreement", ".4g")),
        ("Output cosine similarity (higher is better)", cell("output_cosine", ".6g") + _ci(f, "output_cosine", ".6g")),
        *_budget_rows({k: v for k, v in f.items() if k != "budget"}, "samples"),
        *([("Confidence intervals", _e(f.get("ci_method")))] if f.get("ci_method") else []),
    ]
    shown = {"kl_mean", "top1_agreement", "output_cosine"}
    rows += [
        (f"Why {k} is missing", _e(v))
        for k, v in sorted(reasons.items(), key=lambda kv: str(kv[0]))
        if k not in shown and v
    ]
    return "<h2>Fidelity to the original</h2>" + _kv(rows)


def _job_stages(r: dict) -> str:
    st = r.get("stage_seconds")
    if not isinstance(st, dict) or not st:
        return ""
    head = [("Stage", False), ("Seconds", True)]
    trs = [f"<tr>{_td(_code(k))}{_td(_secs(v), True)}</tr>" for k, v in st.items()]
    return "<h2>Time per stage</h2>" + _table(head, trs)


def _job_evaluation(r: dict) -> str:
    ev = r.get("evaluation")
    if not isinstance(ev, dict) or not ev:
        return ""
    return "<h2>Evaluation settings</h2>" + _kv((str(k), _e(v)) for k, v in ev.items())


def _job_notes(r: dict) -> str:
    notes = r.get("notes")
    if notes in (None, {}, []):
        return ""
    return "<h2>Notes</h2>" + _json_block(notes)


# --- sweep ------------------------------------------------------------------------------------


def render_sweep(sweep: dict) -> str:
    """A sweep (``GET /v1/sweeps/{id}``) as a standalone HTML page: its frontier plot and points."""
    sweep = sweep if isinstance(sweep, dict) else {}
    name = sweep.get("name")
    ident = name if isinstance(name, str) and name else sweep.get("id") or "unknown sweep"
    raw_points = sweep.get("points")
    points = [p for p in raw_points if isinstance(p, dict)] if isinstance(raw_points, list) else []
    parts = [
        f"<h1>Sweep: {_e(ident)}</h1>",
        f'<p class="sub">{_badge(sweep.get("status"))} model {_e(sweep.get("model_id"))}</p>',
        _sweep_overview(sweep),
        _sweep_spec(sweep),
        _sweep_frontier(sweep, points),
        _sweep_points(sweep, points),
    ]
    return _document(f"Sweep: {ident}", "\n".join(p for p in parts if p))


def _sweep_overview(s: dict) -> str:
    rows = [
        ("Sweep id", _code(s.get("id"))),
        ("Name", _e(s.get("name"))),
        ("Model id", _code(s.get("model_id"))),
        ("Status", _badge(s.get("status"))),
        ("Created", _e(s.get("created_at"))),
    ]
    counts = s.get("counts")
    if isinstance(counts, dict):
        rows.append(("Points", ", ".join(f"{_int(v)} {escape(str(k))}" for k, v in counts.items()) or DASH))
    out = "<h2>Overview</h2>" + _kv(rows)
    if s.get("status") in ("queued", "running"):
        out += '<p class="note">The sweep is still running: this page is a snapshot; reload it for newer results.</p>'
    return out


def _vary_keys(s: dict, points: list[dict]) -> list[str]:
    keys: list[str] = []
    vary = _get(s, "spec", "vary")
    if isinstance(vary, dict):
        keys += [str(k) for k in vary]
    for p in points:
        if isinstance(p.get("values"), dict):
            keys += [str(k) for k in p["values"] if str(k) not in keys]
    return list(dict.fromkeys(keys))


def _sweep_spec(s: dict) -> str:
    spec = s.get("spec")
    if not isinstance(spec, dict):
        return "<h2>Specification</h2>" + _reason("Not reported for this sweep.")
    parts = ["<h2>Specification</h2>"]
    steps = spec.get("steps")
    if isinstance(steps, list) and steps:
        trs = []
        for i, st in enumerate(steps):
            st = st if isinstance(st, dict) else {"method": st}
            params = st.get("params")
            trs.append(
                f"<tr>{_td(str(i), True)}{_td(_code(st.get('method')))}"
                f"{_td(_code(params) if params not in (None, {}) else DASH)}</tr>"
            )
        parts.append("<h3>Base steps</h3>" + _table([("Step", True), ("Method", False), ("Parameters", False)], trs))
    vary = spec.get("vary")
    if isinstance(vary, dict) and vary:
        trs = [
            f"<tr>{_td(_code(k))}{_td(', '.join(_e(x) for x in v) if isinstance(v, list) else _e(v))}</tr>"
            for k, v in vary.items()
        ]
        parts.append("<h3>Varied</h3>" + _table([("Field", False), ("Values", False)], trs))
    return "".join(parts)


def _sweep_frontier(s: dict, points: list[dict]) -> str:
    parts = ["<h2>Frontier</h2>"]
    axes = s.get("frontier_axes")
    if isinstance(axes, dict) and axes:
        parts.append(
            "<p>A point is on the frontier when no other point is at least as good on every axis "
            "and better on one. Axes:</p>"
        )
        parts.append(_kv((str(k), _e(v)) for k, v in axes.items()))
    if s.get("frontier_note"):
        parts.append(f'<p class="note">{_e(s.get("frontier_note"))}</p>')
    plotted, metric, hib = [], None, None
    for p in points:
        m = p.get("metrics")
        if not isinstance(m, dict):
            continue
        metric = metric or (m.get("quality_metric") if isinstance(m.get("quality_metric"), str) else None)
        hib = m.get("higher_is_better") if hib is None else hib
        if _n(m.get("artifact_bytes")) is not None and _n(m.get("quality")) is not None:
            plotted.append(
                {
                    "index": p.get("index"),
                    "artifact_bytes": m.get("artifact_bytes"),
                    "quality": m.get("quality"),
                    "latency_ms": m.get("latency_ms"),
                    "on_frontier": _on_frontier(s, p),
                }
            )
    if plotted:
        parts.append(
            _figure(
                charts.sweep_scatter(
                    plotted, quality_label=metric or "quality", higher_is_better=hib if isinstance(hib, bool) else None
                )
            )
        )
        left_out = len(points) - len(plotted)
        if left_out:
            parts.append(
                f'<p class="muted">{left_out} of {len(points)} points are not plotted: they have no '
                "size and quality yet (queued, running or failed); see the table.</p>"
            )
    else:
        parts.append(_reason("No point has both an artifact size and a quality value yet.", "No chart"))
    return "".join(parts)


def _on_frontier(s: dict, p: dict) -> bool:
    if isinstance(p.get("on_frontier"), bool):
        return p["on_frontier"]
    frontier = s.get("frontier")
    return isinstance(frontier, list) and p.get("index") in frontier


def _error_text(err: Any) -> str:
    if err in (None, ""):
        return DASH
    if isinstance(err, dict):
        code, msg = err.get("code"), err.get("message")
        if code or msg:
            return f"<code>{_e(code)}</code> {_e(msg)}" if code else _e(msg)
    return _e(err)


def _sweep_points(s: dict, points: list[dict]) -> str:
    if not points:
        return "<h2>Points</h2>" + _reason("The sweep has no points yet.")
    keys = _vary_keys(s, points)
    head = (
        [("#", True)]
        + [(k, False) for k in keys]
        + [
            ("Status", False),
            ("Artifact size", True),
            ("Ratio", True),
            ("Latency", True),
            ("Quality", True),
            ("KL mean", True),
            ("Top-1", True),
            ("Sparsity", True),
            ("Job", False),
        ]
    )
    trs = []
    for p in points:
        on = _on_frontier(s, p)
        values = p.get("values") if isinstance(p.get("values"), dict) else {}
        m = p.get("metrics") if isinstance(p.get("metrics"), dict) else {}
        star = ' <span class="star" title="on the frontier">★</span>' if on else ""
        cells = [_td(f"{_e(p.get('index'))}{star}", True)]
        cells += [_td(_e(values.get(k)) if k in values else DASH) for k in keys]
        cells += [
            _td(_badge(p.get("status"))),
            _td(_bytes(m.get("artifact_bytes"), stacked=True) if m else DASH, True),
            _td(_ratio(m.get("compression_ratio")) if m else DASH, True),
            _td(_ms(m.get("latency_ms")) if m else DASH, True),
            _td(_fmt(m.get("quality"), ".5g") if m else DASH, True),
            _td(_fmt(m.get("kl_mean"), ".4g") if m else DASH, True),
            _td(_pct(m.get("top1_agreement")) if m else DASH, True),
            _td(_pct(m.get("sparsity")) if m else DASH, True),
            _td(_short_id(p.get("job_id"))),
        ]
        trs.append(f"<tr{' class=frontier' if on else ''}>{''.join(cells)}</tr>")
        if p.get("error") not in (None, ""):
            trs.append(
                f'<tr class="error"><td></td><td colspan="{len(head) - 1}" class="wrap">'
                f"Error: {_error_text(p.get('error'))}</td></tr>"
            )
    legend = (
        '<p class="muted"><span class="star">★</span> and a tinted row: on the frontier. '
        "Job ids are shortened; hover for the full id.</p>"
    )
    return "<h2>Points</h2>" + legend + _table(head, trs, "dense")


def _short_id(value: Any) -> str:
    if isinstance(value, str) and len(value) > 13:
        return f'<code class="nowrap" title="{escape(value)}">{escape(value[:8])}…</code>'
    return _code(value)
