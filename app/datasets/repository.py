from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.tables import Dataset


def get(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))
