"""What a sweep's page says (``sweep_sections``): its spec, its frontier plot and every point.

A point's ``metrics.compression_ratio`` is original ÷ artifact (the JSON's field, kept for
clients); the points table shows its inverse as the size ratio, compressed ÷ original, like the
job report (``units.RATIO_CONVENTION``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.reports import charts, notes, units
from app.reports.job import get
from app.reports.view import Cell, Part, Row, Section, Table, badge, chart, code, muted, short_id, sized, unavailable

fin = units.finite


def sweep_sections(s: dict[str, Any], points: list[dict[str, Any]]) -> list[Section]:
    return [overview(s), spec(s), frontier(s, points), points_section(s, points)]


def overview(s: Mapping[str, Any]) -> Section:
    rows: list[tuple[str, Cell]] = [
        ("Sweep id", code(s.get("id"))),
        ("Name", units.text(s.get("name"))),
        ("Model id", code(s.get("model_id"))),
        ("Status", badge(s.get("status"))),
        ("Created", units.text(s.get("created_at"))),
    ]
    counts = s.get("counts")
    if isinstance(counts, dict):
        rows.append(("Points", ", ".join(f"{units.count(v)} {k}" for k, v in counts.items()) or None))
    sec = Section("Overview", rows=rows)
    if s.get("status") in ("queued", "running"):
        sec.notes.append("The sweep is still running: this page is a snapshot; reload it for newer results.")
    return sec


def vary_keys(s: Mapping[str, Any], points: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    vary = get(s, "spec", "vary")
    if isinstance(vary, dict):
        keys += [str(k) for k in vary]
    for p in points:
        if isinstance(p.get("values"), dict):
            keys += [str(k) for k in p["values"]]
    return list(dict.fromkeys(keys))


def spec(s: Mapping[str, Any]) -> Section:
    sp = s.get("spec")
    if not isinstance(sp, dict):
        return unavailable("Specification", "Not reported for this sweep.")
    sec = Section("Specification")
    steps = sp.get("steps")
    if isinstance(steps, list) and steps:
        rows = []
        for i, st in enumerate(steps):
            st = st if isinstance(st, dict) else {"method": st}
            params = st.get("params")
            rows.append(
                Row([str(i), code(st.get("method")), notes.spelled(params) if params not in (None, {}) else None])
            )
        head = [("Step", True), ("Method", False), ("Parameters", False)]
        sec.tables.append(Table(head, rows, heading="Base steps"))
    vary = sp.get("vary")
    if isinstance(vary, dict) and vary:
        rows = [Row([code(k), notes.spelled(v)]) for k, v in vary.items()]
        sec.tables.append(Table([("Field", False), ("Values", False)], rows, heading="Varied"))
    return sec


def on_frontier(s: Mapping[str, Any], p: Mapping[str, Any]) -> bool:
    if isinstance(p.get("on_frontier"), bool):
        return bool(p["on_frontier"])
    front = s.get("frontier")
    return isinstance(front, list) and p.get("index") in front


def frontier(s: Mapping[str, Any], points: list[dict[str, Any]]) -> Section:
    sec = Section("Frontier")
    axes = s.get("frontier_axes")
    if isinstance(axes, dict) and axes:
        sec.paragraphs.append(
            "A point is on the frontier when no other point is at least as good on every axis and better on one."
        )
        sec.rows = [(f"Axis: {k}", units.text(v)) for k, v in axes.items()]
    if s.get("frontier_note"):
        sec.notes.append(notes.sentence(units.text(s.get("frontier_note"))))
    plotted, metric, hib = [], None, None
    for p in points:
        m = p.get("metrics")
        if not isinstance(m, dict):
            continue
        metric = metric or (m.get("quality_metric") if isinstance(m.get("quality_metric"), str) else None)
        hib = m.get("higher_is_better") if hib is None else hib
        if fin(m.get("artifact_bytes")) is not None and fin(m.get("quality")) is not None:
            plotted.append(
                {
                    "index": p.get("index"),
                    "artifact_bytes": m.get("artifact_bytes"),
                    "quality": m.get("quality"),
                    "latency_ms": m.get("latency_ms"),
                    "on_frontier": on_frontier(s, p),
                }
            )
    if not plotted:
        sec.chart_reason = "No point has both an artifact size and a quality value yet."
        return sec
    sec.chart = chart(
        charts.sweep_scatter(
            plotted, quality_label=metric or "quality", higher_is_better=hib if isinstance(hib, bool) else None
        )
    )
    left_out = len(points) - len(plotted)
    if left_out:
        sec.paragraphs.append(
            muted(
                f"{left_out:,} of {len(points):,} points are not plotted: they have no size and quality yet "
                "(queued, running or failed); see the table."
            )
        )
    return sec


def error_text(err: Any) -> Cell:
    if err in (None, ""):
        return None
    if isinstance(err, dict):
        code_, msg = err.get("code"), err.get("message")
        if code_:
            return Part("seq", parts=(code(code_), " ", units.text(msg) if msg else ""))
        if msg:
            return units.text(msg)
    return notes.spelled(err)


def _point_cells(p: Mapping[str, Any], keys: list[str], on: bool) -> list[Cell]:
    values = p.get("values") if isinstance(p.get("values"), dict) else {}
    m = p.get("metrics") if isinstance(p.get("metrics"), dict) else {}
    inverse = fin(m.get("compression_ratio"))
    index: Cell = units.text(p.get("index"))
    if on:
        index = Part("seq", parts=(index, " ", Part("star", "★", title="on the frontier")))
    return [
        index,
        *[notes.spelled(values[k]) if k in values else None for k in keys],
        badge(p.get("status")),
        sized(m.get("artifact_bytes"), stacked=True) if m else None,
        units.ratio(1 / inverse) if inverse else None,
        units.millis(m.get("latency_ms")) if m else None,
        units.plain(m.get("quality"), 5) if m else None,
        units.plain(m.get("kl_mean")) if m else None,
        units.percent(m.get("top1_agreement")) if m else None,
        units.percent(m.get("sparsity")) if m else None,
        short_id(p.get("job_id")),
    ]


def points_section(s: Mapping[str, Any], points: list[dict[str, Any]]) -> Section:
    if not points:
        return unavailable("Points", "The sweep has no points yet.")
    keys = vary_keys(s, points)
    head = [
        ("#", True),
        *[(k, False) for k in keys],
        ("Status", False),
        ("Artifact size", True),
        ("Size ratio (compressed ÷ original)", True),
        ("Latency", True),
        ("Quality", True),
        ("KL mean", True),
        ("Top-1", True),
        ("Sparsity", True),
        ("Job", False),
    ]
    rows = []
    for p in points:
        on = on_frontier(s, p)
        err = p.get("error")
        rows.append(Row(_point_cells(p, keys, on), cls="frontier" if on else "", error=error_text(err)))
    legend = muted("★ and a tinted row: on the frontier. Job ids are shortened; hover for the full id.")
    return Section("Points", paragraphs=[legend], tables=[Table(head, rows, cls="dense")])
