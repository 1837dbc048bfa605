"""The server-sent event stream of one job (GET /v1/jobs/{id}/events).

The stream replays the job's stored events (core.jobs.repository writes one per change) after the
client's last event id, then polls for new ones until the terminal event. Each poll runs in a
worker thread with its own short-lived session, so an open stream holds no database connection
while it waits, and at most ``_DB_SLOTS`` polls of all streams together use a connection (and a
thread) at a time: a thousand idle streams cost the pool a few connections, not a thousand.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio

from core.db import get_sessionmaker
from core.jobs import repository

POLL_S = 0.5
KEEPALIVE_S = 15.0
_BATCH = 500  # events read per poll; a longer history is replayed over several polls
_DB_SLOTS = 4

# The id of an event built from the job row rather than read from the table (a job that finished
# before events were recorded); stored ids start at 1.
SYNTHETIC_ID = 0

_limiter: anyio.CapacityLimiter | None = None


def _db_limiter() -> anyio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(_DB_SLOTS)
    return _limiter


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Poll:
    events: list[Event]
    # The job is finished (or gone) and the client has its terminal event, or gets ``synthetic``.
    done: bool = False
    status: str | None = None
    synthetic: Event | None = None


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


def _event(job_id: str, id_: int, type_: str, at: datetime | None, data: dict[str, Any]) -> Event:
    return Event(id_, type_, {"job_id": job_id, "at": _iso(at), **data})


def poll(job_id: str, after: int) -> Poll:
    """The job's events after ``after``; when there are none and the job is finished, ``done``
    (with the synthetic terminal event when the job's history has none). Reads the job row before
    the events again: its terminal event commits with its terminal status, so a finished row means
    the second read holds every event the job will ever have."""
    with get_sessionmaker()() as s:
        rows = repository.events_after(s, job_id, after, _BATCH)
        if not rows:
            job = repository.get_unscoped(s, job_id)
            if job is None:  # deleted while streaming (its tenant went)
                return Poll([], done=True)
            if job.status not in repository.TERMINAL:
                return Poll([])
            rows = repository.events_after(s, job_id, after, _BATCH)
            if not rows:
                last = repository.last_event(s, job_id)
                synthetic = None
                if last is None or last.data.get("status") not in repository.TERMINAL:
                    synthetic = _event(
                        job_id, SYNTHETIC_ID, "status", job.finished_at or job.created_at, repository.event_data(job)
                    )
                return Poll([], done=True, status=job.status, synthetic=synthetic)
        return Poll([_event(job_id, r.id, r.type, r.created_at, r.data) for r in rows])


def format_event(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n"


def _end(job_id: str, status: str | None) -> str:
    # No id: a client's Last-Event-ID stays the terminal event's.
    return f"event: end\ndata: {json.dumps({'job_id': job_id, 'status': status}, separators=(',', ':'))}\n\n"


def is_terminal(event: Event) -> bool:
    return event.type == "status" and event.data.get("status") in repository.TERMINAL


async def stream(job_id: str, after: int) -> AsyncIterator[str]:
    """SSE text: every event after ``after``, then new ones as they are recorded, a keep-alive
    comment after ``KEEPALIVE_S`` of silence, and ``end`` after the terminal event."""
    quiet = 0.0
    while True:
        p = await anyio.to_thread.run_sync(poll, job_id, after, limiter=_db_limiter())
        for event in p.events:
            yield format_event(event)
            after = event.id
            if is_terminal(event):
                yield _end(job_id, event.data["status"])
                return
        if p.done:
            if p.synthetic is not None:
                yield format_event(p.synthetic)
            yield _end(job_id, p.status)
            return
        if p.events:
            quiet = 0.0
            if len(p.events) >= _BATCH:
                continue  # more may be behind a full batch
        await anyio.sleep(POLL_S)
        quiet += POLL_S
        if quiet >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0
