"""The one query of the dashboard's own: the live state of the jobs a page shows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.tables import Job


def job_states(session: Session, tenant_id: str, job_ids: list[str]) -> list[Any]:
    """``(id, status, progress_stage, progress_fraction)`` of those of ``job_ids`` that are the tenant's."""
    return list(
        session.execute(
            select(Job.id, Job.status, Job.progress_stage, Job.progress_fraction).where(
                Job.tenant_id == tenant_id, Job.id.in_(job_ids)
            )
        )
    )
