"""Numbers as people read them: the report pages' one set of formats.

Durations: ``412 ms``, ``13.8 s``, ``2 min 5 s``, ``1 h 4 min``. Sizes in decimal units
(``541.6 MB``, 1 MB = 1,000,000 bytes, as disks and downloads count them). Counts with thousands
separators (``1,234,567``). Every other number with a few significant digits and never in
scientific notation (``13,830``, not ``1.383e+04``). Ratios are written ``0.5×``; which way round a
ratio is taken is the page's business (``RATIO_CONVENTION``).

Every function takes anything: a value that is not a real finite number (None, a string, NaN, a
bool) comes back as text (``—`` for None), so a page never fails on a malformed report.
"""

from __future__ import annotations

import json
import math
from typing import Any

DASH = "—"

RATIO_CONVENTION = (
    "Ratios are compressed ÷ original: below 1 means smaller, faster (less time per pass) or, "
    "for a metric where lower is better, better."
)
SIZE_UNITS = "Sizes are in decimal units: 1 kB = 1,000 bytes, 1 MB = 1,000,000 bytes."

_SIZE_UNITS = ("kB", "MB", "GB", "TB", "PB")


def finite(value: Any) -> float | None:
    """A real finite number as a float, or None (bools, strings and NaN are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def text(value: Any) -> str:
    """Any value as plain text: None and NaN as a dash, containers as compact JSON (the last
    resort: notes.spelled writes them out in words)."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if isinstance(value, float) and not math.isfinite(value):
        return DASH if math.isnan(value) else ("-∞" if value < 0 else "∞")
    return str(value)


def plain(value: Any, sig: int = 4) -> str:
    """``sig`` significant digits, thousands separators, no trailing zeros, never an exponent:
    ``13830.2`` → ``13,830``, ``0.012345`` → ``0.01235``, ``2.0`` → ``2``."""
    v = finite(value)
    if v is None:
        return text(value)
    if v == 0:
        return "0"
    # Digits after the point that keep `sig` significant ones (none for large numbers); capped,
    # so a value like 1e-30 reads 0 rather than thirty zeros.
    decimals = min(max(sig - 1 - math.floor(math.log10(abs(v))), 0), 12)
    out = f"{v:,.{decimals}f}"
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return "0" if out in ("-0", "") else out


def count(value: Any) -> str:
    """A count: ``1,234,567``."""
    v = finite(value)
    if v is None:
        return text(value)
    return f"{v:,.0f}" if v == int(v) else plain(v)


def size(value: Any) -> str:
    """Bytes in decimal units with one decimal: ``999 B``, ``500.0 kB``, ``541.6 MB``."""
    v = finite(value)
    if v is None:
        return text(value)
    sign, n = ("-" if v < 0 else ""), abs(v)
    if n < 999.5:
        return f"{sign}{n:.0f} B"
    for unit in _SIZE_UNITS:
        n /= 1000.0
        if n < 999.95 or unit == _SIZE_UNITS[-1]:
            return f"{sign}{n:,.1f} {unit}"
    raise AssertionError("unreachable")


def seconds(value: Any) -> str:
    """A duration given in seconds: ``412 ms``, ``4.12 s``, ``13.8 s``, ``2 min 5 s``, ``1 h 4 min``."""
    v = finite(value)
    if v is None:
        return text(value)
    sign, s = ("-" if v < 0 else ""), abs(v)
    if s < 0.9995:
        return sign + _ms(s * 1000.0)
    if s < 9.995:
        return f"{sign}{s:.2f} s"
    if s < 59.95:
        return f"{sign}{s:.1f} s"
    whole = round(s)
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{sign}{minutes} min" + (f" {rest} s" if rest else "")
    minutes = round(s / 60)
    hours, rest = divmod(minutes, 60)
    return f"{sign}{hours:,} h" + (f" {rest} min" if rest else "")


def millis(value: Any) -> str:
    """A duration given in milliseconds, written as :func:`seconds` writes it."""
    v = finite(value)
    return text(value) if v is None else seconds(v / 1000.0)


def _ms(ms: float) -> str:
    if ms < 0.9995:
        return f"{plain(ms, 2)} ms"
    if ms < 9.995:
        return f"{ms:.2f} ms"
    if ms < 99.95:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"


def percent(value: Any) -> str:
    """A fraction as a percentage: ``0.5`` → ``50.0 %``; below 1 % with two decimals."""
    v = finite(value)
    if v is None:
        return text(value)
    pct = v * 100
    return f"{pct:.2f} %" if 0 < abs(pct) < 0.995 else f"{pct:.1f} %"


def ratio(value: Any) -> str:
    """``0.5`` → ``0.5×`` (three significant digits)."""
    v = finite(value)
    return text(value) if v is None else f"{plain(v, 3)}×"


def signed(value: Any, sig: int = 4) -> str:
    """A difference with its sign: ``+2.2``, ``-0.013``."""
    v = finite(value)
    if v is None:
        return text(value)
    return ("+" if v > 0 else "") + plain(v, sig)
