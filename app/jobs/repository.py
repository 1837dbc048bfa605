"""All SQL on jobs, for the API and for workers.

Worker writes are fenced: every write after the claim carries ``attempt`` and applies only while
the row still has that attempt and is running. A worker that lost its lease (and whose job was
claimed again) therefore cannot overwrite the newer attempt's state.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.pagination import page
from app.tables import Job, utcnow

TERMINAL = ("succeeded", "failed", "canceled")


def get(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def list_page(session: Session, tenant_id: str, status: str | None, limit: int, cursor: str | None) -> list[Job]:
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(Job.status == status)
    return list(session.scalars(page(stmt, Job, limit, cursor)))


def cancel_queued(session: Session, job_id: str) -> bool:
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="canceled", cancel_requested=True, finished_at=now, progress_stage="canceled")
    )
    return res.rowcount == 1


def request_cancel(session: Session, job_id: str) -> bool:
    res = session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
    return res.rowcount == 1


# --- worker side -------------------------------------------------------------------------------


def claim(session: Session, job_id: str, lease_s: int) -> int | None:
    """Compare-and-set: take a queued job (or a running one whose lease expired); return the new
    attempt number, or None if someone else holds it or it is finished."""
    now = utcnow()
    row = session.execute(select(Job.attempt, Job.status).where(Job.id == job_id)).first()
    if row is None:
        return None
    attempt, status = row
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempt == attempt,
            or_(Job.status == "queued", (Job.status == "running") & (Job.lease_expires_at < now)),
        )
        .values(
            status="running",
            attempt=attempt + 1,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
            progress_stage="starting",
            progress_fraction=0.0,
        )
    )
    session.commit()
    return attempt + 1 if res.rowcount == 1 else None


def _fenced(job_id: str, attempt: int):  # noqa: ANN202
    return update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "running")


def progress(session: Session, job_id: str, attempt: int, stage: str, fraction: float, lease_s: int) -> bool:
    """Record progress and renew the lease; False if this attempt no longer holds the job."""
    res = session.execute(
        _fenced(job_id, attempt).values(
            progress_stage=stage, progress_fraction=fraction, lease_expires_at=utcnow() + timedelta(seconds=lease_s)
        )
    )
    session.commit()
    return res.rowcount == 1


def heartbeat(session: Session, job_id: str, attempt: int, lease_s: int) -> bool:
    """Renew the lease of a running attempt (fenced); False if the attempt lost the job."""
    res = session.execute(_fenced(job_id, attempt).values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
    session.commit()
    return res.rowcount == 1


def take_stale(session: Session, requeue_after_s: int, limit: int = 100) -> list[tuple[str, str]]:
    """Jobs whose message may be lost: queued, or running with an expired lease, and last sent
    more than ``requeue_after_s`` ago. Each is marked sent now with a compare-and-set on
    ``enqueued_at``, so concurrent reconcilers re-send a job once. Returns (id, queue) pairs."""
    now = utcnow()
    cutoff = now - timedelta(seconds=requeue_after_s)
    stale = or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff)
    rows = session.execute(
        select(Job.id, Job.queue, Job.enqueued_at)
        .where(stale, or_(Job.status == "queued", (Job.status == "running") & (Job.lease_expires_at < now)))
        .order_by(Job.created_at)
        .limit(limit)
    ).all()
    taken = []
    for job_id, queue, sent in rows:
        same = Job.enqueued_at.is_(None) if sent is None else Job.enqueued_at == sent
        if session.execute(update(Job).where(Job.id == job_id, same).values(enqueued_at=now)).rowcount == 1:
            taken.append((job_id, queue))
    session.commit()
    return taken


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(session: Session, job_id: str, attempt: int, status: str, **values: Any) -> bool:
    assert status in TERMINAL
    now: datetime = utcnow()
    res = session.execute(
        _fenced(job_id, attempt).values(status=status, finished_at=now, lease_expires_at=None, **values)
    )
    session.commit()
    return res.rowcount == 1
