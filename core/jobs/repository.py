"""All SQL on jobs, for the API and for workers.

Worker writes are fenced: every write after the claim carries ``attempt`` and applies only while
the row still has that attempt and is running. A worker that lost its lease (and whose job was
claimed again) therefore cannot overwrite the newer attempt's state.

Events: every change of a job that a client sees (status, cancel request, attempt, progress) adds
one ``job_events`` row in the transaction of the change, always *after* the UPDATE of the job row.
The UPDATE holds the row's lock until commit, so a job's events get their ids in commit order, and
a reader that saw event N of a job never later finds an event of that job below N
(GET /v1/jobs/{id}/events relies on it). Lease renewals (``heartbeat``, a ``progress`` call that
repeats the last stage and fraction) and the reconciler's re-send (``take_stale``, which changes no
status) write none.

Leases: a running attempt's lease is renewed every few seconds by a keeper process that dies with
the job's process (worker/heartbeat.py); an expired lease means the attempt's process is gone (or
cut off from the database), and the reconciler re-sends the job at once (``take_stale``).

Poison jobs: a job whose every attempt killed its worker is claimable again each time its lease
expires. ``claim`` takes it only while ``attempt < max_attempts``; at the limit ``give_up`` fails
it (``too_many_attempts``) by compare-and-set instead of running it again.

Webhooks: every terminal transition (``finish``, ``give_up``, ``cancel_queued``) goes through
``_record_end``, which also adds the job's webhook delivery (core/webhooks/repository.py) in the
same transaction: a job that ended has its delivery, a rolled-back end has none.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Update, case, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from core.db import rowcount
from core.jobs.schemas import JobOut, WebhookPayload
from core.pagination import page
from core.tables import Job, JobEvent, WebhookDelivery, Worker, new_id, utcnow

TERMINAL = ("succeeded", "failed", "canceled")

# The columns an event is built from (event_data).
_EVENT_COLUMNS = (
    Job.status,
    Job.attempt,
    Job.cancel_requested,
    Job.progress_stage,
    Job.progress_fraction,
    Job.error_code,
    Job.error_message,
    Job.artifact_size_bytes,
    Job.artifact_sha256,
    Job.artifact_filename,
)


def get(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def delete_finished(session: Session, job_ids: list[str]) -> bool:
    """Delete these jobs with their events and finished webhook deliveries, all or none: False
    (nothing deleted) unless every one of them is terminal (a job that is not cannot be deleted).
    A delivery still pending is kept and sent: the job ended, and its receiver is told so even
    when the job was deleted right after (the dispatcher removes it once it is final)."""
    if not job_ids:
        return True
    # Locked first: a worker's write (which updates the row) waits for this transaction.
    ended = session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status.in_(TERMINAL)).with_for_update()).all()
    if len(ended) != len(set(job_ids)):
        return False
    session.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)))
    session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(job_ids), WebhookDelivery.status != "pending")
    )
    session.execute(delete(Job).where(Job.id.in_(job_ids)))
    return True


def list_page(session: Session, tenant_id: str, status: str | None, limit: int, cursor: str | None) -> list[Job]:
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(Job.status == status)
    return list(session.scalars(page(stmt, Job, limit, cursor)))


# --- events ------------------------------------------------------------------------------------


def event_data(job: Any) -> dict[str, Any]:
    """A status event's data from a job (a ``Job`` or a row of ``_EVENT_COLUMNS``): status,
    attempt, cancel_requested, progress; ``error`` when failed, ``artifact`` when succeeded."""
    data: dict[str, Any] = {
        "status": job.status,
        "attempt": job.attempt,
        "cancel_requested": bool(job.cancel_requested),
        "progress": {"stage": job.progress_stage, "fraction": job.progress_fraction},
    }
    if job.status == "failed" and job.error_code:
        data["error"] = {"code": job.error_code, "message": job.error_message or ""}
    if job.status == "succeeded" and job.artifact_sha256:
        data["artifact"] = {
            "size_bytes": job.artifact_size_bytes,
            "sha256": job.artifact_sha256,
            "filename": job.artifact_filename,
        }
    return data


def record_submitted(session: Session, job: Job) -> None:
    """The first event of a new job (flushed, not yet committed): queued."""
    session.add(JobEvent(job_id=job.id, type="status", data=event_data(job)))


def _record_status(session: Session, job_id: str) -> None:
    """A status event with the job's state as this transaction sees it (after its UPDATE)."""
    row = session.execute(select(*_EVENT_COLUMNS).where(Job.id == job_id)).one()
    session.execute(insert(JobEvent).values(job_id=job_id, type="status", data=event_data(row)))


def _record_end(session: Session, job_id: str) -> None:
    """A terminal status's status event and, for a job with a ``webhook_url``, its webhook delivery
    (the outbox row the dispatcher sends), both in the transaction of the status change."""
    _record_status(session, job_id)
    add_webhook_delivery(session, job_id)


def events_after(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    """The job's events with an id above ``after``, oldest first."""
    return list(
        session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
        )
    )


def last_event(session: Session, job_id: str) -> JobEvent | None:
    return session.scalar(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1))


def get_unscoped(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


# --- cancel ------------------------------------------------------------------------------------


def cancel_queued(session: Session, job_id: str) -> bool:
    now = utcnow()
    matched = rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="canceled", cancel_requested=True, finished_at=now, progress_stage="canceled"),
    )
    if matched == 1:
        _record_end(session, job_id)
    return matched == 1


def request_cancel(session: Session, job_id: str) -> bool:
    """Flag a running job for cancellation; False if it is not running or already flagged."""
    matched = rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.cancel_requested.is_(False))
        .values(cancel_requested=True),
    )
    if matched == 1:
        _record_status(session, job_id)
    return matched == 1


# --- worker side -------------------------------------------------------------------------------


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Queued, or running with an expired lease (its worker died or hung)."""
    return or_(Job.status == "queued", (Job.status == "running") & (Job.lease_expires_at < now))


def claim(session: Session, job_id: str, lease_s: int, max_attempts: int | None = None) -> int | None:
    """Compare-and-set: take a queued job (or a running one whose lease expired); return the new
    attempt number, or None if someone else holds it, it is finished, or it already used
    ``max_attempts`` attempts (then ``give_up`` is what fails it)."""
    now = utcnow()
    row = session.execute(select(Job.attempt, Job.status).where(Job.id == job_id)).first()
    if row is None:
        return None
    attempt, status = row
    if max_attempts is not None and attempt >= max_attempts:
        session.rollback()
        return None
    matched = rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, _claimable(now))
        .values(
            status="running",
            attempt=attempt + 1,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
            progress_stage="starting",
            progress_fraction=0.0,
        ),
    )
    if matched == 1:
        _record_status(session, job_id)
    session.commit()
    return attempt + 1 if matched == 1 else None


def attempts_died_message(attempts: int) -> str:
    span = "attempt 1" if attempts == 1 else f"attempts 1-{attempts}"
    times = "once" if attempts == 1 else f"{attempts} times"
    return f"the job's worker died {times} while running it ({span}); it is not retried again"


def give_up(session: Session, job_id: str, max_attempts: int) -> bool:
    """Fail a poison job: one that is claimable again (queued, or running with an expired lease)
    although it already used ``max_attempts`` attempts, each of which ended without a result
    (a worker that finishes a job, even as failed, writes a terminal status). One compare-and-set
    on (attempt, claimable status), so of two workers (or a worker and a reconciler) one acts;
    the ``failed`` status event is written in the same transaction, like ``finish`` does. True if
    this call failed the job."""
    now = utcnow()
    row = session.execute(select(Job.attempt).where(Job.id == job_id)).first()
    if row is None or row[0] < max_attempts:
        session.rollback()
        return False
    attempt = row[0]
    matched = rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, _claimable(now))
        .values(
            status="failed",
            finished_at=now,
            lease_expires_at=None,
            progress_stage="failed",
            error_code="too_many_attempts",
            error_message=attempts_died_message(attempt),
        ),
    )
    if matched == 1:
        _record_end(session, job_id)
    session.commit()
    return matched == 1


def give_up_exhausted(session: Session, max_attempts: int, limit: int = 100) -> list[str]:
    """The reconciler's side of ``give_up``: fail every claimable job at ``max_attempts``
    (a lease-expired running job whose last allowed attempt died, or a queued one). Returns their ids."""
    ids = session.scalars(
        select(Job.id).where(Job.attempt >= max_attempts, _claimable(utcnow())).order_by(Job.created_at).limit(limit)
    ).all()
    session.rollback()
    return [job_id for job_id in ids if give_up(session, job_id, max_attempts)]


def _fenced(job_id: str, attempt: int) -> Update:
    return update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "running")


def progress(session: Session, job_id: str, attempt: int, stage: str, fraction: float, lease_s: int) -> bool:
    """Record progress and renew the lease; False if this attempt no longer holds the job. A
    progress event is written when the stage or fraction changed."""
    before = session.execute(select(Job.progress_stage, Job.progress_fraction).where(Job.id == job_id)).first()
    matched = rowcount(
        session,
        _fenced(job_id, attempt).values(
            progress_stage=stage, progress_fraction=fraction, lease_expires_at=utcnow() + timedelta(seconds=lease_s)
        ),
    )
    if matched == 1 and (before is None or tuple(before) != (stage, fraction)):
        data = {"status": "running", "attempt": attempt, "progress": {"stage": stage, "fraction": fraction}}
        session.execute(insert(JobEvent).values(job_id=job_id, type="progress", data=data))
    session.commit()
    return matched == 1


def heartbeat(session: Session, job_id: str, attempt: int, lease_s: int) -> bool:
    """Renew the lease of a running attempt (fenced); False if the attempt lost the job."""
    matched = rowcount(session, _fenced(job_id, attempt).values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
    session.commit()
    return matched == 1


def end_lease(session: Session, job_id: str, attempt: int) -> bool:
    """The attempt's process is known to be dead (its lease keeper saw it exit): its lease ends
    now (fenced), so the job is claimable at once instead of when the lease would have run out."""
    matched = rowcount(session, _fenced(job_id, attempt).values(lease_expires_at=utcnow()))
    session.commit()
    return matched == 1


def take_stale(
    session: Session, requeue_after_s: int, reclaim_resend_s: int | None = None, limit: int = 100
) -> list[tuple[str, str, bool]]:
    """Jobs whose message may be lost, each marked sent now with a compare-and-set on
    ``enqueued_at`` (so concurrent reconcilers re-send a job once). Returns (id, queue, reclaim)
    triples; ``reclaim`` is true for a job taken back from a dead attempt.

    * Running with an expired lease and not sent since it expired (``reclaim``): its worker died
      (its message went with it, or was acknowledged by a worker whose claim the lease still
      refused), so it is re-sent at once, once per expiry; each later attempt's lease expires
      after this send, so a job that dies again is re-sent again at once.
    * A re-sent reclaim that no worker claimed within ``reclaim_resend_s`` (default
      ``requeue_after_s``): sent again. Its message can be lost too (taken by a worker that was
      killed before it claimed the job: Redis holds such a message until its visibility timeout,
      hours), and a job whose worker died should not wait minutes more for that.
    * Queued and last sent more than ``requeue_after_s`` ago: a message lost with a broker outage
      or a failed send."""
    now = utcnow()
    cutoff = now - timedelta(seconds=requeue_after_s)
    resend = now - timedelta(seconds=requeue_after_s if reclaim_resend_s is None else reclaim_resend_s)
    expired = (Job.status == "running") & (Job.lease_expires_at < now)
    stale = or_(
        Job.enqueued_at.is_(None),
        Job.enqueued_at < cutoff,
        expired & ((Job.enqueued_at < Job.lease_expires_at) | (Job.enqueued_at < resend)),
    )
    rows = session.execute(
        select(Job.id, Job.queue, Job.enqueued_at, Job.status)
        .where(stale, _claimable(now))
        .order_by(case((expired, 0), else_=1), Job.created_at)  # reclaims first, however long the queue
        .limit(limit)
    ).all()
    taken = []
    for job_id, queue, sent, status in rows:
        same = Job.enqueued_at.is_(None) if sent is None else Job.enqueued_at == sent
        if rowcount(session, update(Job).where(Job.id == job_id, same).values(enqueued_at=now)) == 1:
            taken.append((job_id, queue, status == "running"))
    session.commit()
    return taken


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(session: Session, job_id: str, attempt: int, status: str, **values: Any) -> bool:
    assert status in TERMINAL
    now: datetime = utcnow()
    matched = rowcount(
        session, _fenced(job_id, attempt).values(status=status, finished_at=now, lease_expires_at=None, **values)
    )
    if matched == 1:
        _record_end(session, job_id)
    session.commit()
    return matched == 1


# --- plans and budgets -------------------------------------------------------------------------


def live_workers(session: Session, queue: str, since: datetime) -> list[Worker]:
    """Workers serving ``queue`` seen at or after ``since`` (worker.registry.live_since())."""
    rows = session.scalars(select(Worker).where(Worker.last_seen_at >= since)).all()
    return [w for w in rows if queue in (w.queues or [])]


def fail_over_budget(session: Session, job_id: str, message: str) -> bool:
    """Fail a job no worker of the fleet can take (``job_exceeds_worker_budget``) before any
    attempt ran it: a compare-and-set on a claimable state (queued, or running with an expired
    lease), so a worker that claimed it meanwhile wins. True if this call failed it."""
    now = utcnow()
    matched = rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, _claimable(now))
        .values(
            status="failed",
            finished_at=now,
            lease_expires_at=None,
            progress_stage="failed",
            error_code="job_exceeds_worker_budget",
            error_message=message,
        ),
    )
    if matched == 1:
        _record_end(session, job_id)
    session.commit()
    return matched == 1


def record_throughput(session: Session, worker_id: str, path: str, bytes_per_s: float, weight: float = 0.3) -> None:
    """Fold one job's measured work bytes per second into the worker's running average for the
    plan path (an exponential average: the newest job weighs ``weight``)."""
    worker = session.get(Worker, worker_id, with_for_update=True)
    if worker is None:
        session.rollback()
        return
    seen = dict(worker.throughput or {})
    old = seen.get(path) or {}
    jobs = int(old.get("jobs", 0))
    avg = bytes_per_s if not jobs else (1 - weight) * float(old["bytes_per_s"]) + weight * bytes_per_s
    seen[path] = {"bytes_per_s": round(avg, 1), "jobs": jobs + 1}
    worker.throughput = seen
    session.commit()


def add_webhook_delivery(session: Session, job_id: str) -> str | None:
    """In the transaction that just gave the job its terminal status (after its UPDATE): add the
    delivery of a job that has a ``webhook_url``, with the job as that transaction sees it as its
    payload. Returns the delivery id, or None when the job has no webhook."""
    row = session.execute(select(Job.webhook_url, Job.tenant_id).where(Job.id == job_id)).first()
    if row is None or not row.webhook_url:
        return None
    job = session.get(Job, job_id, populate_existing=True)  # the row after the UPDATE, not a stale copy
    assert job is not None
    delivery_id, now = new_id(), utcnow()
    event = f"job.{job.status}"
    payload = WebhookPayload(id=delivery_id, event=event, created_at=now, job=JobOut.from_row(job)).model_dump(
        mode="json"
    )
    session.execute(
        insert(WebhookDelivery).values(
            id=delivery_id,
            job_id=job_id,
            tenant_id=row.tenant_id,
            url=row.webhook_url,
            event=event,
            payload=payload,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    return delivery_id
