"""What the templates draw: sections, tables and the few kinds of inline text a cell holds.

Python decides what a page says (``job.py``, ``sweep.py``); the templates (``templates/``) decide
the markup, and Jinja2 escapes every string on the way out. A cell's value is a plain ``str``
(escaped text), None (a dash) or a :class:`Part`, whose ``kind`` the ``show`` macro of
``templates/_macros.html.j2`` turns into its element. The only markup built outside the templates
is a chart's SVG, drawn by matplotlib (``charts``), which escapes the text it writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from app.reports import units

_STATUSES = {"queued", "running", "succeeded", "failed", "canceled", "partial"}


@dataclass(frozen=True)
class Part:
    """Inline text with a role: ``code``, ``muted``, ``exact`` (the exact figure beside a rounded
    one), ``badge`` (``cls`` is the status), ``better`` / ``worse``, ``strong``, ``short`` (shortened
    text, the full text in ``title``), ``star`` (a marker, explained by ``title``), ``br``, or
    ``seq`` (its ``parts`` in a row)."""

    kind: str
    text: str = ""
    parts: tuple[Cell, ...] = ()
    cls: str = ""
    title: str = ""


Cell = str | Part | None


def code(value: Any) -> Part:
    return Part("code", units.text(value))


def muted(text: str) -> Part:
    return Part("muted", text)


def strong(text: str) -> Part:
    return Part("strong", text)


def seq(*parts: Cell) -> Part:
    return Part("seq", parts=tuple(parts))


BR = Part("br")


def badge(status: Any) -> Part:
    cls = status if isinstance(status, str) and status in _STATUSES else "other"
    return Part("badge", units.text(status), cls=cls)


def sized(value: Any, *, stacked: bool = False) -> Cell:
    """``500.0 kB (500,000 bytes)``: the rounded size and the exact count."""
    if units.finite(value) is None:
        return units.text(value)
    return seq(units.size(value), BR if stacked else " ", Part("exact", f"({units.count(value)} bytes)"))


def short_id(value: Any) -> Cell:
    """A long id cut to its first 8 characters, the whole id on hover."""
    if isinstance(value, str) and len(value) > 13:
        return Part("short", value[:8] + "…", title=value)
    return code(value)


def chart(svg: str) -> Markup:
    # matplotlib's SVG writer escapes every text it draws and charts._finish_svg the aria-label:
    # the element is markup already, and is the one thing the templates print unescaped.
    return Markup(svg)  # noqa: S704


@dataclass
class Table:
    head: list[tuple[str, bool]]  # (label, numeric)
    rows: list[Row]
    cls: str = ""
    summary: str = ""  # folds the table into <details> under this summary
    open: bool = True
    heading: str = ""  # an <h3> above the table


@dataclass
class Row:
    cells: list[Cell]
    cls: str = ""
    error: Cell = None  # a full-width line under the row


@dataclass
class Section:
    """One ``<h2>`` section. ``reason`` replaces everything else: the section is not available
    (``(heading, why)``). ``chart_reason`` stands where a chart is not drawn, and says why."""

    title: str
    reason: tuple[str, str] | None = None
    callouts: list[tuple[str, str]] = field(default_factory=list)  # (heading, text) in a box
    paragraphs: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cards: list[tuple[str, Cell]] = field(default_factory=list)
    chart: Markup | None = None
    chart_reason: str = ""
    rows: list[tuple[str, Cell]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  # a bulleted list of sentences


def unavailable(title: str, why: str, what: str = "Not available") -> Section:
    return Section(title, reason=(what, why))
