"""The worker registry's read side: which workers are live, and when a queue's worker was last seen.

Workers write their rows (worker/registry.py); the API reads them here (``GET /v1/workers``,
whether a queued GPU job has a worker to wait for, the metrics), and so does the worker's budget
check.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import get_settings
from core.tables import Worker, utcnow

# A worker is live while its last renewal is under this many reconcile intervals old.
LIVE_INTERVALS = 3
FORGET_AFTER = timedelta(days=1)


def live_since() -> datetime:
    """Workers seen at or after this time are live."""
    return utcnow() - timedelta(seconds=LIVE_INTERVALS * get_settings().reconcile_interval_s)


def all_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.hostname, Worker.pid)))


def last_seen(session: Session, queue: str) -> datetime | None:
    """When a worker serving ``queue`` was last seen (None: no registered worker serves it)."""
    times = [seen for queues, seen in session.execute(select(Worker.queues, Worker.last_seen_at)) if queue in queues]
    return max(times, default=None)
