"""Content negotiation for routes that answer JSON or, for a browser, an HTML page."""

from __future__ import annotations

# Pages are self-contained (inline CSS, inline SVG charts, no script): this policy lets nothing
# else load, so a value that slipped past escaping still could not run or fetch anything.
HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _weights(accept: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        if not fields[0]:
            continue
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        out[fields[0].lower()] = max(q, out.get(fields[0].lower(), 0.0))
    return out


def prefers_html(accept: str | None) -> bool:
    """True when the client ranks ``text/html`` above JSON (a browser's ``Accept``); a missing
    header, ``*/*`` or ``application/json`` get JSON."""
    if not accept:
        return False
    w = _weights(accept)
    html = w.get("text/html", w.get("text/*", 0.0))
    json_ = max(w.get("application/json", 0.0), w.get("application/*", 0.0) * 0.999, w.get("*/*", 0.0) * 0.998)
    return html > 0 and html > json_
