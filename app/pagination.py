"""Opaque keyset cursors over (created_at, id), newest first."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_

from app.errors import Unprocessable


def encode_cursor(created_at: datetime, id_: str) -> str:
    raw = json.dumps([created_at.isoformat(), id_]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def next_cursor(rows: list[Any], limit: int) -> str | None:
    """The cursor after a page fetched by ``page`` (which asks for ``limit + 1`` rows)."""
    return encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, id_ = json.loads(raw)
        return datetime.fromisoformat(ts), str(id_)
    except Exception:
        raise Unprocessable(
            "cursor is not valid", errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}]
        ) from None


def page(stmt: Select[Any], table: Any, limit: int, cursor: str | None) -> Select[Any]:
    if cursor:
        ts, id_ = decode_cursor(cursor)
        stmt = stmt.where(or_(table.created_at < ts, and_(table.created_at == ts, table.id < id_)))
    return stmt.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
