"""Opaque keyset cursors over (created_at, id), newest first, the RFC 8288 ``Link`` header of a
list page, and the strict integers of query strings (the page size of every list route among them)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from annotated_types import Ge, Le
from pydantic import BeforeValidator
from sqlalchemy import Select, and_, or_

from core import jsonsafe, signing
from core.errors import Unprocessable

# Decimal digits, and a zero fraction (JSON Schema's integers include 5.0; a client generated
# from the spec may write one so).
_DIGITS = re.compile(r"([0-9]{1,19})(?:\.0{1,20})?")


def _decimal_digits(value: Any) -> Any:
    """A query integer as plain decimal digits: pydantic's lax str -> int would also take
    " 5", "+5" and "1_000" (and a JSON body's true as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, str):
        m = _DIGITS.fullmatch(value)
        if m is None:
            raise ValueError("must be written as decimal digits only")
        return m.group(1)
    return value


def query_int(ge: int, le: int) -> Any:
    """An integer of a query string, strictly, within [ge, le]. The bounds sit on the int, inside
    the validator: given to ``Query()`` they would reach the spec as "ge"/"le", not JSON Schema's
    "minimum"/"maximum"."""
    return Annotated[int, Ge(ge), Le(le), BeforeValidator(_decimal_digits)]


def encode_cursor(created_at: datetime, id_: str) -> str:
    raw = json.dumps([created_at.isoformat(), id_]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def next_cursor(rows: list[Any], limit: int) -> str | None:
    """The cursor after a page fetched by ``page`` (which asks for ``limit + 1`` rows)."""
    return encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        # The strict loader: a cursor is client input (a lone surrogate in the id would reach
        # the database driver and fail there).
        ts, id_ = jsonsafe.loads(raw)
        if not isinstance(ts, str) or not isinstance(id_, str):
            raise ValueError("not a cursor")
        return datetime.fromisoformat(ts), id_
    except Exception:
        raise Unprocessable(
            "cursor is not valid", errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}]
        ) from None


def page(stmt: Select[Any], table: Any, limit: int, cursor: str | None) -> Select[Any]:
    if cursor:
        ts, id_ = decode_cursor(cursor)
        stmt = stmt.where(or_(table.created_at < ts, and_(table.created_at == ts, table.id < id_)))
    return stmt.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)


# What may stay unescaped in a Link target: RFC 3986's reserved and unreserved characters, and
# escapes already made. "<", ">", '"', spaces and the rest are escaped: a target ends at ">".
_URI_SAFE = ":/?#[]@!$&'()*+,;=%~"


def page_links(base: str, path: str, query: Iterable[tuple[str, str]], next_cursor: str | None) -> str:
    """The ``Link`` value of a list page: ``rel="first"`` (the query without ``cursor``) and, unless
    ``next_cursor`` is None (the last page), ``rel="next"`` (the query with ``cursor`` set to it).
    The query keeps the request's other parameters (``limit``, filters) in their order."""
    kept = [(k, v) for k, v in query if k != "cursor"]

    def target(items: list[tuple[str, str]]) -> str:
        url = base + path + (f"?{urlencode(items)}" if items else "")
        return quote(url, safe=_URI_SAFE)

    links = [f'<{target(kept)}>; rel="first"']
    if next_cursor is not None:
        links.append(f'<{target([*kept, ("cursor", next_cursor)])}>; rel="next"')
    return ", ".join(links)


def link_header(request: Any, next_cursor: str | None) -> str:
    """:func:`page_links` for the list route serving ``request`` (a Starlette request). As for
    signed links (core/signing.py), only the route and the query string are taken from the
    request (the path from the route table, without a root path); the base is the public base
    URL, never the request's ``Host``: the links are relative where there is none (cluster mode
    without one), which a client resolves against the URL it asked."""
    path = str(request.app.url_path_for(request.scope["route"].name, **request.path_params))
    return page_links(signing.public_base_url(), path, request.query_params.multi_items(), next_cursor)
