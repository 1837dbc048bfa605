"""All SQL of imports: the ``models`` rows in status "importing", fenced by their lease.

An import's lease (``models.lease_expires_at``) is also its fencing token: a process holds an
import while the row's lease is the exact value it wrote, and every write of the import (progress,
renewal, the outcome) is a compare-and-set on that value. A process that lost its lease (it
stalled past it and another took the import over, or the model was deleted) changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db import rowcount
from core.tables import Model


def get(session: Session, model_id: str) -> Model | None:
    return session.get(Model, model_id, populate_existing=True)


def claimable(session: Session, now: datetime, limit: int) -> list[str]:
    """Imports nobody holds: never claimed yet (lease null) or whose holder is gone (lease past)."""
    stmt = (
        select(Model.id)
        .where(
            Model.status == "importing",
            (Model.lease_expires_at.is_(None)) | (Model.lease_expires_at < now),
        )
        .order_by(Model.created_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def _held(model_id: str, token: datetime | None) -> Any:
    lease = Model.lease_expires_at.is_(None) if token is None else Model.lease_expires_at == token
    return update(Model).where(Model.id == model_id, Model.status == "importing", lease)


def cas(session: Session, model_id: str, token: datetime | None, **values: Any) -> bool:
    """Set ``values`` on the import if its lease is still ``token`` (None: unclaimed); whether it was."""
    stmt = _held(model_id, token).values(**values).execution_options(synchronize_session=False)
    return rowcount(session, stmt) == 1
