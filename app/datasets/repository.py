from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core.pagination import page
from core.tables import Dataset, Job


def get(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


def list_page(session: Session, tenant_id: str, limit: int, cursor: str | None) -> list[Dataset]:
    stmt = page(select(Dataset).where(Dataset.tenant_id == tenant_id), Dataset, limit, cursor)
    return list(session.scalars(stmt))


def active_job_count(session: Session, dataset_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                or_(Job.dataset_id == dataset_id, Job.eval_dataset_id == dataset_id),
                Job.status.in_(("queued", "running")),
            )
        )
        or 0
    )
