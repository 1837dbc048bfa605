from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.pagination import page
from core.tables import Job, Model


def get(session: Session, tenant_id: str, model_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant_id))


def list_page(session: Session, tenant_id: str, limit: int, cursor: str | None) -> list[Model]:
    stmt = page(select(Model).where(Model.tenant_id == tenant_id), Model, limit, cursor)
    return list(session.scalars(stmt))


def active_job_count(session: Session, model_id: str) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.model_id == model_id, Job.status.in_(("queued", "running")))
        )
        or 0
    )
