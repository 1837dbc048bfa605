"""Server-side charts for the report pages, drawn with matplotlib and returned as inline SVG.

Every chart function returns the ``<svg>…</svg>`` element alone (no XML declaration, no DOCTYPE, no
comments, no RDF metadata), ready to paste into an HTML page. The output is deterministic: the same input gives the
same bytes (fixed ``svg.hashsalt``, no date in the metadata). Text stays text (``<text>``, escaped
by matplotlib's SVG writer) in a font stack that ends in the generic ``sans-serif``. Element ids are
prefixed with a digest of the chart, so several charts can share one page without their clip paths
and markers colliding.

matplotlib (and with it numpy) is imported inside the functions only, so ``import app`` stays
light. pyplot is never used: figures are plain ``Figure`` objects rendered by the SVG canvas, so
no GUI backend is loaded, nothing is registered in pyplot's global figure manager (there is
nothing to close or to leak), and rendering does not touch pyplot's global state. The rcParams
used while drawing are set under a lock, because ``rc_context`` changes process-wide settings.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import threading
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any, Literal

from app.reports import units

SVG_HASH_SALT = "modelpress-reports"

ValueKind = Literal["bytes", "ms", "number"]

BEFORE_COLOUR = "#8a9bb0"
AFTER_COLOUR = "#2f6db5"
FRONTIER_COLOUR = "#d1495b"

_LOCK = threading.Lock()
_RC = {
    "svg.hashsalt": SVG_HASH_SALT,
    # Text as <text> elements: a fifth of the size of glyph paths, selectable, and the layout
    # holds with any sans-serif font (anchors are set per label).
    "svg.fonttype": "none",
    "svg.image_inline": True,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e3e6ea",
    "grid.linewidth": 0.8,
    "figure.dpi": 100,
    "text.usetex": False,
}


def format_value(value: float, kind: ValueKind) -> str:
    """A number as shown on a chart, in the page's units (``units``): ``541.6 MB``, ``13.8 s``,
    ``52.31``."""
    if kind == "bytes":
        return units.size(value)
    if kind == "ms":
        return units.millis(value)
    return units.plain(value)


def _finite(x: Any) -> float | None:
    """``x`` as a float when it is a real finite number (bool excluded), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _plain(text: str) -> str:
    """Text that matplotlib draws literally: ``$`` would otherwise start mathtext. With every
    ``$`` escaped the text is never math, and matplotlib turns each ``\\$`` back into ``$``."""
    return str(text).replace("$", r"\$")


def _shorten(text: str, limit: int = 48) -> str:
    """Cut the middle of a long label (layer names differ at both ends)."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep // 2] + "…" + text[len(text) - (keep - keep // 2) :]


_ID_RE = re.compile(r'\bid="([^"]+)"')
_REF_RE = re.compile(r'(url\(#|href="#)([^)"]+)')


def _finish_svg(raw: str, label: str) -> str:
    """Cut matplotlib's SVG file down to an inline ``<svg>`` element with unique ids."""
    svg = raw[raw.index("<svg") :]
    svg = re.sub(r"<!--.*?-->\n?", "", svg, flags=re.S)
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    prefix = "c" + hashlib.sha256(svg.encode()).hexdigest()[:10] + "-"
    svg = _ID_RE.sub(lambda m: f'id="{prefix}{m.group(1)}"', svg)
    svg = _REF_RE.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}", svg)
    return svg.replace("<svg ", f'<svg class="chart" role="img" aria-label="{escape(label)}" ', 1).strip()


def _render(draw, label: str) -> str:  # noqa: ANN001  (draw: Callable[[Figure], None])
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with _LOCK, matplotlib.rc_context(_RC):
        fig = Figure(layout="constrained")
        FigureCanvasSVG(fig)
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        fig.clear()
    return _finish_svg(buf.getvalue(), label)


def before_after_bars(
    title: str,
    groups: Sequence[tuple[str, float | None, float | None]],
    *,
    kind: ValueKind = "number",
    axis_label: str = "",
    ranges: Sequence[tuple[tuple[float, float] | None, tuple[float, float] | None]] | None = None,
    names: tuple[str, str] = ("original", "compressed"),
) -> str:
    """Paired bars, one pair per group: ``(group label, before, after)``. A missing value leaves
    its bar out and writes "n/a" in its place. ``ranges`` (one ``(before, after)`` pair of
    ``(low, high)`` per group, or None) draws whiskers, e.g. the min–max of latency samples."""
    if not groups:
        raise ValueError("before_after_bars needs at least one group")

    def draw(fig) -> None:  # noqa: ANN001
        from matplotlib.ticker import FuncFormatter

        fig.set_size_inches(4.6 if len(groups) == 1 else 6.4, 2.4 + 0.2 * len(groups))
        ax = fig.add_subplot()
        width = 0.38
        top = 0.0
        for i, (_, before, after) in enumerate(groups):
            for side, (value, colour, offset) in enumerate(
                ((before, BEFORE_COLOUR, -width / 2), (after, AFTER_COLOUR, width / 2))
            ):
                rng = ranges[i][side] if ranges is not None and i < len(ranges) and ranges[i] else None
                label = names[side] if i == 0 else None
                top = max(top, _bar(ax, i + offset, width, _finite(value), colour, label, rng, kind))
        ax.set_xticks(range(len(groups)), [_plain(_shorten(g[0], 32)) for g in groups])
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), (top or 1.0) * 1.15)
        ax.grid(axis="x", visible=False)
        # Ticks in the labels' units, never a "1e4" offset above the axis.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_value(y, kind)))
        if axis_label:
            ax.set_ylabel(_plain(axis_label))
        ax.set_title(_plain(title), loc="left")
        # Below the plot: never on top of a bar, its label or the title.
        fig.legend(loc="outside lower center", frameon=False, ncols=2, fontsize=8)

    return _render(draw, title)


def _bar(
    ax,  # noqa: ANN001
    x: float,
    width: float,
    v: float | None,
    colour: str,
    label: str | None,
    rng: tuple[float, float] | None,
    kind: ValueKind,
) -> float:
    """One bar of :func:`before_after_bars` with its value above it (with whiskers over ``rng``),
    or "n/a" for a missing value; the height its label sits at (0 for "n/a")."""
    if v is None:
        ax.bar(x, 0, width, color=colour, label=label)
        ax.annotate(
            "n/a",
            (x, 0),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            color="#666666",
        )
        return 0.0
    err, label_y = None, v
    if rng is not None and _finite(rng[0]) is not None and _finite(rng[1]) is not None:
        err = [[max(v - rng[0], 0.0)], [max(rng[1] - v, 0.0)]]
        label_y = max(v, rng[1])
    ax.bar(
        x,
        v,
        width,
        color=colour,
        label=label,
        yerr=err,
        capsize=4 if err else 0,
        error_kw={"elinewidth": 1, "ecolor": "#333333"},
    )
    ax.annotate(
        _plain(format_value(v, kind)),
        (x, label_y),
        xytext=(0, 3),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=8,
    )
    return label_y


def layer_sparsity_bars(
    layers: Sequence[tuple[str, float | None]],
    *,
    overall: float | None = None,
    max_layers: int = 40,
) -> str:
    """Horizontal bars of the fraction of zeros per layer, ``(name, sparsity)`` in model order.
    With more than ``max_layers`` layers the chart keeps the ``max_layers // 2`` most and least
    sparse (each half in model order) and says how many it left out, so the figure's height is
    capped however large the model; the page's table lists them all."""
    rows = [(str(name), _finite(s)) for name, s in layers]
    if not rows:
        raise ValueError("layer_sparsity_bars needs at least one layer")
    shown, omitted = _sampled_layers(rows, max_layers)
    overall_v = _finite(overall)

    def draw(fig) -> None:  # noqa: ANN001
        from matplotlib.ticker import PercentFormatter

        fig.set_size_inches(6.4, 1.2 + 0.19 * len(shown))
        ax = fig.add_subplot()
        ticks, labels = _sparsity_rows(ax, shown, omitted)
        if overall_v is not None:
            ax.axvline(
                overall_v,
                color=FRONTIER_COLOUR,
                linewidth=1,
                linestyle="--",
                label=_plain(f"overall sparsity {overall_v:.1%}"),
            )
            fig.legend(loc="outside lower center", frameon=False, fontsize=8)
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_ylim(len(shown) - 0.5, -0.5)
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("fraction of weights that are zero")
        title = "Sparsity per layer"
        if omitted:
            half = max(max_layers // 2, 1)
            title += f"\n{len(shown) - 1} of {len(rows)} layers shown: the {half} most and the {half} least sparse"
        ax.set_title(_plain(title), loc="left")

    return _render(draw, "Sparsity per layer")


def _sampled_layers(
    rows: list[tuple[str, float | None]], max_layers: int
) -> tuple[list[tuple[str, float | None] | None], int]:
    """The rows :func:`layer_sparsity_bars` draws (None: the gap where layers are left out) and how
    many it leaves out: all of them up to ``max_layers``, else the most and the least sparse."""
    if len(rows) <= max_layers:
        return list(rows), 0
    half = max(max_layers // 2, 1)
    order = sorted(range(len(rows)), key=lambda i: (rows[i][1] is None, -(rows[i][1] or 0.0), i))
    most, least = sorted(order[:half]), sorted(order[-half:])
    omitted = len(rows) - len(most) - len(least)
    return [rows[i] for i in most] + [None] + [rows[i] for i in least], omitted


def _sparsity_rows(
    ax,  # noqa: ANN001
    shown: list[tuple[str, float | None] | None],
    omitted: int,
) -> tuple[list[int], list[str]]:
    """Draw one bar (or "n/a", or the gap) per row; the y ticks and labels of the layers."""
    ticks, labels = [], []
    for y, row in enumerate(shown):
        if row is None:
            ax.axhline(y, color="#999999", linewidth=0.8, linestyle=(0, (2, 2)))
            ax.text(
                0.5,
                y,
                f"… {omitted} layers between these not shown (see the table) …",
                ha="center",
                va="center",
                fontsize=8,
                color="#555555",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            )
            continue
        name, s = row
        ticks.append(y)
        labels.append(_plain(_shorten(name)))
        if s is None:
            ax.text(0.005, y, "n/a", va="center", fontsize=7, color="#666666")
        else:
            ax.barh(y, s, 0.72, color=AFTER_COLOUR)
    return ticks, labels


_ScatterPoint = tuple[Any, float, float, float | None, bool]  # index, bytes, quality, latency, on frontier


def sweep_scatter(
    points: Sequence[Mapping[str, Any]],
    *,
    quality_label: str = "quality",
    higher_is_better: bool | None = None,
) -> str:
    """Size against quality for a sweep's points: ``{"index", "artifact_bytes", "quality",
    "latency_ms", "on_frontier"}`` each. Colour and marker size encode latency (grey when a point
    has none); frontier points are ringed and joined by a line in order of size; every point is
    labelled with its index. Points without both size and quality are left out."""
    pts: list[_ScatterPoint] = []
    for p in points:
        x, y = _finite(p.get("artifact_bytes")), _finite(p.get("quality"))
        if x is not None and y is not None:
            pts.append((p.get("index"), x, y, _finite(p.get("latency_ms")), bool(p.get("on_frontier"))))
    if not pts:
        raise ValueError("sweep_scatter needs at least one point with artifact_bytes and quality")

    def draw(fig) -> None:  # noqa: ANN001
        from matplotlib.ticker import FuncFormatter

        fig.set_size_inches(6.8, 4.2)
        ax = fig.add_subplot()
        no_lat = _scatter_points(fig, ax, pts)
        for idx, x, y, _, on in pts:
            ax.annotate(
                _plain(f"#{idx}"),
                (x, y),
                xytext=(7, 6),
                textcoords="offset points",
                fontsize=8,
                fontweight="bold" if on else "normal",
                color=FRONTIER_COLOUR if on else "#333333",
                zorder=4,
            )
        ax.margins(0.12)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: units.size(v) if v >= 0 else ""))
        ax.set_xlabel("artifact size (lower is better)")
        direction = {True: " (higher is better)", False: " (lower is better)"}.get(higher_is_better, "")
        ax.set_ylabel(_plain(quality_label + direction))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: units.plain(v)))
        _scatter_legend(ax, with_no_latency=bool(no_lat))
        ax.set_title("Sweep: size vs quality (colour and size = latency)", loc="left")

    return _render(draw, "Sweep: size vs quality")


def _scatter_points(fig, ax, pts: list[_ScatterPoint]) -> list[_ScatterPoint]:  # noqa: ANN001
    """The frontier's line, the points coloured and sized by latency (with its colour bar), the
    points without latency in grey, and rings on the frontier's; returns the grey ones."""
    from matplotlib.colors import Normalize

    lat = [p[3] for p in pts if p[3] is not None]
    norm = Normalize(min(lat), max(lat) if max(lat) > min(lat) else min(lat) + 1.0) if lat else None
    front = sorted((p for p in pts if p[4]), key=lambda p: (p[1], p[2]))
    if len(front) > 1:
        ax.plot([p[1] for p in front], [p[2] for p in front], color=FRONTIER_COLOUR, linewidth=1.4, zorder=1)
    with_lat = [p for p in pts if p[3] is not None]
    if with_lat:
        sizes = [40 + 160 * float(norm(p[3])) for p in with_lat]
        sc = ax.scatter(
            [p[1] for p in with_lat],
            [p[2] for p in with_lat],
            c=[p[3] for p in with_lat],
            s=sizes,
            cmap="viridis",
            norm=norm,
            edgecolors="white",
            linewidths=0.6,
            zorder=2,
        )
        from matplotlib.ticker import FuncFormatter

        bar = fig.colorbar(sc, ax=ax, label="latency, also marker size", pad=0.01)
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: units.millis(v)))
    no_lat = [p for p in pts if p[3] is None]
    if no_lat:
        ax.scatter(
            [p[1] for p in no_lat],
            [p[2] for p in no_lat],
            s=40,
            color="#b0b0b0",
            edgecolors="white",
            linewidths=0.6,
            zorder=2,
        )
    if front:
        ax.scatter(
            [p[1] for p in front],
            [p[2] for p in front],
            s=260,
            facecolors="none",
            edgecolors=FRONTIER_COLOUR,
            linewidths=1.6,
            zorder=3,
        )
    return no_lat


def _scatter_legend(ax, *, with_no_latency: bool) -> None:  # noqa: ANN001
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=FRONTIER_COLOUR,
            marker="o",
            markerfacecolor="none",
            markersize=9,
            linewidth=1.4,
            label="frontier",
        )
    ]
    if with_no_latency:
        handles.append(Line2D([], [], color="#b0b0b0", marker="o", linestyle="none", label="no latency"))
    ax.legend(handles=handles, loc="best", frameon=True, fontsize=8)
