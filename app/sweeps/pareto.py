"""The Pareto frontier of a sweep: the points that no other point beats on every axis at once.

Axes (each used only when every compared point has it):

* ``size``: ``artifact_bytes``, lower is better;
* ``latency``: ``latency_ms``, lower is better;
* ``quality``: the jobs' quality metric (perplexity, accuracy, ...), in the direction the metric
  reports (``higher_is_better``); left out when the points disagree on the metric or its direction.

A point dominates another when it is no worse on every axis and strictly better on at least one,
so points that tie on every axis are all on the frontier. Points without metrics (not succeeded,
or measured on none of the axes) are left out, and the note says so. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# (axis name, metrics key), in the order the note and ``frontier_axes`` list them.
AXES: tuple[tuple[str, str], ...] = (("size", "artifact_bytes"), ("latency", "latency_ms"), ("quality", "quality"))


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, a bool, NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def dominates(a: Sequence[float], b: Sequence[float], minimize: Sequence[bool]) -> bool:
    """True when ``a`` is no worse than ``b`` on every axis and strictly better on one."""
    better = False
    for x, y, lower in zip(a, b, minimize, strict=True):
        if not lower:
            x, y = -x, -y
        if x > y:
            return False
        if x < y:
            better = True
    return better


def non_dominated(vectors: Sequence[Sequence[float]], minimize: Sequence[bool]) -> list[int]:
    """Positions (in input order) of the vectors that no other vector dominates."""
    for v in vectors:
        if len(v) != len(minimize):
            raise ValueError(f"a vector has {len(v)} values for {len(minimize)} axes")
    return [
        i for i, v in enumerate(vectors) if not any(dominates(w, v, minimize) for j, w in enumerate(vectors) if j != i)
    ]


@dataclass(frozen=True)
class Frontier:
    indices: list[int]  # the ``index`` of every point on the frontier, ascending
    axes: dict[str, str]  # axis name -> what it compares, e.g. "artifact_bytes (lower is better)"
    note: str


def _list(indices: Sequence[int]) -> str:
    return ", ".join(str(i) for i in indices)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def sweep_frontier(points: Sequence[Mapping[str, Any]]) -> Frontier:
    """The frontier of a sweep's points, each ``{"index", "status", "metrics": {...} | None}``
    with metrics as in the sweep report (``artifact_bytes``, ``latency_ms``, ``quality``,
    ``quality_metric``, ``higher_is_better``)."""
    notes: list[str] = []
    candidates = _candidates(points, notes)
    if not candidates:
        notes.append("No point has metrics yet, so there is no frontier.")
        return Frontier([], {}, " ".join(notes))

    axes: dict[str, str] = {}
    keys: list[str] = []
    minimize: list[bool] = []
    for axis, key in AXES:
        compared = _axis(axis, key, candidates, notes)
        if compared is not None:
            label, lower = compared
            axes[axis] = f"{label} ({'lower' if lower else 'higher'} is better)"
            keys.append(key)
            minimize.append(lower)

    if not axes:
        notes.append("No axis is measured for every point, so there is no frontier.")
        return Frontier([], {}, " ".join(notes))

    vectors = [[float(number(p["metrics"][k])) for k in keys] for p in candidates]  # type: ignore[arg-type]
    on = sorted(candidates[i]["index"] for i in non_dominated(vectors, minimize))
    notes.append(
        f"{_plural(len(candidates), 'point')} compared on {', '.join(axes)}; {len(on)} on the frontier "
        "(a point is left off when another is at least as good on every axis and better on one)."
    )
    return Frontier(on, axes, " ".join(notes))


def _candidates(points: Sequence[Mapping[str, Any]], notes: list[str]) -> list[Mapping[str, Any]]:
    """The points measured on at least one axis; a note for each kind of point left out."""
    no_metrics = [p for p in points if not p.get("metrics")]
    if no_metrics:
        by_status: dict[str, list[int]] = {}
        for p in no_metrics:
            by_status.setdefault(str(p.get("status") or "unknown"), []).append(p["index"])
        parts = [f"{_list(ix)} ({status})" for status, ix in sorted(by_status.items())]
        notes.append(f"Left out, no metrics: point{'s' if len(no_metrics) > 1 else ''} {'; '.join(parts)}.")

    measured = [p for p in points if p.get("metrics")]
    candidates = [p for p in measured if any(number(p["metrics"].get(key)) is not None for _, key in AXES)]
    kept = {id(p) for p in candidates}
    bare = [p["index"] for p in measured if id(p) not in kept]
    if bare:
        notes.append(f"Left out, measured on none of the axes: point{'s' if len(bare) > 1 else ''} {_list(bare)}.")
    return candidates


def _axis(axis: str, key: str, candidates: Sequence[Mapping[str, Any]], notes: list[str]) -> tuple[str, bool] | None:
    """``(label, lower is better)`` when every candidate can be compared on the axis; else None,
    with a note saying why it is left out."""
    lacking = [p["index"] for p in candidates if number(p["metrics"].get(key)) is None]
    what = "a quality score" if axis == "quality" else key
    if len(lacking) == len(candidates):
        notes.append(f"The {axis} axis is left out: no point has {what}.")
        return None
    if lacking:
        notes.append(
            f"The {axis} axis is left out: point{'s' if len(lacking) > 1 else ''} {_list(lacking)} "
            f"{'have' if len(lacking) > 1 else 'has'} no {what}."
        )
        return None
    if axis == "latency" and all(number(p["metrics"].get("speedup")) is None for p in candidates):
        # No point runs faster kernels or smaller shapes than the original (e.g. unstructured
        # pruning): their latencies differ by noise alone, which must not pick the frontier.
        notes.append(
            "The latency axis is left out: no point claims a speed-up (each runs the original's "
            "kernels), so latency differences are measurement noise."
        )
        return None
    if axis != "quality":
        return key, True
    names = {p["metrics"].get("quality_metric") for p in candidates}
    directions = {p["metrics"].get("higher_is_better") for p in candidates}
    if len(names) != 1:
        shown = ", ".join(sorted(str(n) for n in names))
        notes.append(f"The quality axis is left out: the points report different metrics ({shown}).")
        return None
    if len(directions) != 1 or not isinstance(next(iter(directions)), bool):
        notes.append("The quality axis is left out: the points do not agree whether higher is better.")
        return None
    return str(next(iter(names)) or "quality"), not next(iter(directions))
