"""Opaque keyset cursors over (created_at, id), newest first, and the strict integers of query
strings (the page size of every list route among them)."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import BeforeValidator
from sqlalchemy import Select, and_, or_

from core import jsonsafe
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
