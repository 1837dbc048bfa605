"""All SQL on webhook deliveries: the dispatcher's claim / record pair (worker/webhooks.py), and the
list a job's owner reads. The outbox row itself is added with the job's end, in the same
transaction (core/jobs/repository.py ``add_webhook_delivery``).

A try is taken by compare-and-set on ``(status pending, attempts, due)``: the winner increments
``attempts`` and moves ``next_attempt_at`` to the end of a lease that outlasts the try, so no other
dispatcher takes the row while the request is in flight, and one that died mid-try only delays
the row by the lease. The outcome is written fenced on the same ``attempts``: a dispatcher that
overran its lease (and whose row was taken again) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session

from core.db import rowcount
from core.tables import Job, WebhookDelivery, utcnow


def list_for_job(session: Session, job_id: str) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
    )


@dataclass(frozen=True)
class Claim:
    """One try of a delivery, held by the dispatcher that claimed it."""

    id: str
    job_id: str
    tenant_id: str
    attempt: int  # this try's number, 1-based
    url: str
    event: str
    payload: dict[str, Any]


def claim_next(session: Session, max_attempts: int, lease_s: float, scan: int = 20) -> Claim | None:
    """Take the next due try of a pending delivery (compare-and-set), or None if none is due.

    A due row that already used ``max_attempts`` tries (its last dispatcher died mid-try, or the
    limit was lowered) is failed instead. Commits."""
    now = utcnow()
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.attempts)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(scan)
    ).all()
    session.rollback()
    for delivery_id, attempts in rows:
        same = update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.attempts == attempts,
            WebhookDelivery.next_attempt_at <= now,
        )
        if attempts >= max_attempts:
            session.execute(
                same.values(
                    status="failed",
                    next_attempt_at=None,
                    last_error=f"gave up after {attempts} attempts (the last one did not report back)",
                )
            )
            _drop_if_job_gone(session, delivery_id)
            session.commit()
            continue
        matched = rowcount(
            session,
            same.values(
                attempts=attempts + 1,
                last_attempt_at=now,
                next_attempt_at=now + timedelta(seconds=lease_s),
            ),
        )
        if matched != 1:
            session.rollback()  # another dispatcher took this try
            continue
        d = session.execute(
            select(
                WebhookDelivery.job_id,
                WebhookDelivery.tenant_id,
                WebhookDelivery.url,
                WebhookDelivery.event,
                WebhookDelivery.payload,
            ).where(WebhookDelivery.id == delivery_id)
        ).one()
        session.commit()
        return Claim(delivery_id, d.job_id, d.tenant_id, attempts + 1, d.url, d.event, d.payload)
    return None


def record(
    session: Session,
    claim: Claim,
    *,
    delivered: bool,
    final: bool,
    status_code: int | None,
    error: str | None,
    retry_in_s: float,
) -> bool:
    """The outcome of a claimed try, fenced on its attempt: ``delivered``; else failed for good
    when ``final``, otherwise due again in ``retry_in_s``. False if the try no longer held the row. Commits."""
    now = utcnow()
    values: dict[str, Any] = {"last_status_code": status_code, "last_error": error}
    if delivered:
        values.update(status="delivered", delivered_at=now, next_attempt_at=None, last_error=None)
    elif final:
        values.update(status="failed", next_attempt_at=None)
    else:
        values.update(next_attempt_at=now + timedelta(seconds=retry_in_s))
    matched = rowcount(
        session,
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claim.id,
            WebhookDelivery.attempts == claim.attempt,
            WebhookDelivery.status == "pending",
        )
        .values(**values),
    )
    if matched == 1 and (delivered or final):
        _drop_if_job_gone(session, claim.id)
    session.commit()
    return matched == 1


def _drop_if_job_gone(session: Session, delivery_id: str) -> None:
    """A final delivery whose job was deleted meanwhile (core/jobs/repository.py delete_finished
    keeps a pending one so that it is still sent): nothing will read the row again."""
    session.execute(
        delete(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status != "pending",
            ~exists().where(Job.id == WebhookDelivery.job_id),
        )
    )
