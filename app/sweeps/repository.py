"""All SQL on sweeps (their points are jobs with ``sweep_id`` set)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.pagination import page
from core.tables import Job, Sweep


def get(session: Session, tenant_id: str, sweep_id: str) -> Sweep | None:
    return session.scalar(select(Sweep).where(Sweep.id == sweep_id, Sweep.tenant_id == tenant_id))


def get_unscoped(session: Session, sweep_id: str) -> Sweep | None:
    """Any tenant's sweep: only for a request that proved its right by a signed link."""
    return session.scalar(select(Sweep).where(Sweep.id == sweep_id))


def list_page(session: Session, tenant_id: str, limit: int, cursor: str | None) -> list[Sweep]:
    return list(session.scalars(page(select(Sweep).where(Sweep.tenant_id == tenant_id), Sweep, limit, cursor)))


def jobs_of(session: Session, sweep_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.sweep_id == sweep_id).order_by(Job.created_at, Job.id)))


def status_counts(session: Session, sweep_ids: list[str]) -> dict[str, dict[str, int]]:
    """``{sweep_id: {status: jobs}}`` for the given sweeps, in one query."""
    out: dict[str, dict[str, int]] = {i: {} for i in sweep_ids}
    if not sweep_ids:
        return out
    rows = session.execute(
        select(Job.sweep_id, Job.status, func.count())
        .where(Job.sweep_id.in_(sweep_ids))
        .group_by(Job.sweep_id, Job.status)
    )
    for sweep_id, status, n in rows:
        out[sweep_id][status] = n
    return out
