"""All SQL on uploads (tus, /v1/uploads). Offsets move only by compare-and-set: an update names the
offset it read, and matches nothing when another request moved it meanwhile."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from core.db import rowcount
from core.tables import Upload


def get(session: Session, tenant_id: str, upload_id: str) -> Upload | None:
    return session.scalars(select(Upload).where(Upload.id == upload_id, Upload.tenant_id == tenant_id)).one_or_none()


def get_many(session: Session, tenant_id: str, upload_ids: Sequence[str]) -> dict[str, Upload]:
    rows = session.scalars(select(Upload).where(Upload.id.in_(list(upload_ids)), Upload.tenant_id == tenant_id))
    return {u.id: u for u in rows}


def add(session: Session, upload: Upload) -> None:
    session.add(upload)
    session.flush()


def pending_bytes(session: Session, tenant_id: str) -> int:
    """Bytes declared by the tenant's uploads not consumed yet (they will count once stored)."""
    total = session.scalar(
        select(func.coalesce(func.sum(Upload.length), 0)).where(
            Upload.tenant_id == tenant_id, Upload.consumed_at.is_(None)
        )
    )
    return int(total or 0)


def open_count(session: Session, tenant_id: str) -> int:
    """The tenant's uploads not consumed (unfinished, or finished and waiting to be used)."""
    n = session.scalar(
        select(func.count()).select_from(Upload).where(Upload.tenant_id == tenant_id, Upload.consumed_at.is_(None))
    )
    return int(n or 0)


def advance(session: Session, upload_id: str, old_offset: int, new_offset: int, sha256: str | None) -> bool:
    """Move the offset from ``old_offset`` to ``new_offset`` (and record the file's sha256 once
    complete); False if the row is gone or its offset is not ``old_offset`` any more."""
    stmt = (
        update(Upload)
        .where(Upload.id == upload_id, Upload.offset == old_offset, Upload.consumed_at.is_(None))
        .values(offset=new_offset, sha256=sha256)
    )
    return rowcount(session, stmt) == 1


def consume(session: Session, upload_ids: Sequence[str], now: datetime) -> int:
    """Mark complete, unconsumed, unexpired uploads consumed; the number marked (on PostgreSQL the
    rows stay locked until the commit, so a concurrent consumer waits, then matches none)."""
    stmt = (
        update(Upload)
        .where(
            Upload.id.in_(list(upload_ids)),
            Upload.consumed_at.is_(None),
            Upload.offset == Upload.length,
            Upload.expires_at > now,
        )
        .values(consumed_at=now)
    )
    return rowcount(session, stmt)


def remove(session: Session, upload_id: str) -> bool:
    return rowcount(session, delete(Upload).where(Upload.id == upload_id)) == 1


def expired_ids(session: Session, now: datetime, limit: int) -> list[str]:
    return list(session.scalars(select(Upload.id).where(Upload.expires_at <= now).limit(limit)))


def remove_expired(session: Session, upload_id: str, now: datetime) -> bool:
    return rowcount(session, delete(Upload).where(Upload.id == upload_id, Upload.expires_at <= now)) == 1


def existing_ids(session: Session, upload_ids: Sequence[str]) -> set[str]:
    return set(session.scalars(select(Upload.id).where(Upload.id.in_(list(upload_ids)))))
