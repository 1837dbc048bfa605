"""Standalone HTML pages for a job's report and for a sweep.

``render_job_report(report)`` and ``render_sweep(sweep)`` are pure: a dict in (the JSON of
``GET /v1/jobs/{id}/report`` and ``GET /v1/sweeps/{id}``), a complete HTML5 document out. What a
page says is decided in ``job`` and ``sweep`` (sections of ``view`` objects, numbers written by
``units``, notes as sentences by ``notes``); the markup is the Jinja2 templates in ``templates/``,
rendered with autoescaping on, so every string taken from the input is escaped by the engine.

A page has inline CSS and inline SVG charts only: no script, no external resource (not even a
favicon request), and it carries its own Content-Security-Policy (``PAGE_CSP``) in a ``<meta>``
element.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup, escape

from app.reports import units
from app.reports.job import job_sections
from app.reports.sweep import sweep_sections
from app.reports.view import badge

PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
"""What the pages need: inline ``<style>`` and the SVGs' style attributes, and the empty ``data:``
favicon. Serve the pages with this header (plus ``frame-ancestors 'none'``, which a ``<meta>``
cannot carry)."""

CONVENTION = f"{units.RATIO_CONVENTION} {units.SIZE_UNITS}"


def _wbr(label: Any) -> Markup:
    """Long dotted names (``steps[0].params.sparsity``) may break after a dot in a narrow column."""
    return escape(str(label)).replace(".", Markup(".<wbr>"))


@cache
def environment() -> jinja2.Environment:
    """The templates' environment: package files, autoescaping on every template, and an error
    (not an empty string) for a name a template uses that the page does not give."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("app.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["wbr"] = _wbr
    return env


def _page(title: str, status: Any, model_id: Any, sections: list[Any]) -> str:
    return (
        environment()
        .get_template("page.html.j2")
        .render(
            title=title,
            status=badge(status),
            model_id=units.text(model_id),
            convention=CONVENTION,
            csp=PAGE_CSP,
            sections=sections,
        )
    )


def render_job_report(report: dict[str, Any]) -> str:
    """The job's report (``GET /v1/jobs/{id}/report``) as a standalone HTML page."""
    report = report if isinstance(report, dict) else {}
    name = report.get("job_name")
    ident = name if isinstance(name, str) and name else report.get("job_id") or "unknown job"
    return _page(f"Job report: {units.text(ident)}", report.get("status"), report.get("model_id"), job_sections(report))


def render_sweep(sweep: dict[str, Any]) -> str:
    """A sweep (``GET /v1/sweeps/{id}``) as a standalone HTML page: its frontier plot and points."""
    sweep = sweep if isinstance(sweep, dict) else {}
    name = sweep.get("name")
    ident = name if isinstance(name, str) and name else sweep.get("id") or "unknown sweep"
    raw = sweep.get("points")
    points = [p for p in raw if isinstance(p, dict)] if isinstance(raw, list) else []
    return _page(
        f"Sweep: {units.text(ident)}", sweep.get("status"), sweep.get("model_id"), sweep_sections(sweep, points)
    )
