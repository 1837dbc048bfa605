"""Queue names, the task's name and arguments, the broker settings, and sending a job's message.

The API and the reconciler send tasks by name (``send_task``) through :func:`client`, a Celery app
with no task modules; the worker's app (worker/celery_app.py) is built by the same
:func:`make_celery`, so both sides use the same broker options (priorities, visibility timeout, key
prefix). Nothing here imports torch or the worker.

Delivery guarantees: late acks and prefetch 1, so a message is only removed once its job has
finished; a worker killed mid-job leaves the message to be redelivered (Redis: after the
visibility timeout, set above the job time limit). The job row, not the message, is the truth:
the task's claim is a compare-and-set on the row, so a redelivered message never runs a job twice.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery  # type: ignore[import-untyped]  # Celery ships no type information
from kombu.entity import Queue

from core.config import get_settings
from core.logs import current_request_id, log_context, new_request_id

log = logging.getLogger("modelpress.queue")

TASK_RUN_JOB = "modelpress.run_job"
QUEUES = ("cpu", "gpu")
# Message priorities on Redis (kombu keeps one list per priority step and a worker takes from the
# lowest number first): a job taken back from a dead worker goes ahead of the queued ones, so its
# next attempt starts as soon as a worker is free, not after the whole queue. kombu's SQLAlchemy
# transport (embedded mode) has no priorities: there a reclaimed job waits its turn.
PRIORITY_RECLAIM = 0
PRIORITY_NORMAL = 5


def make_celery(include: list[str] | None = None) -> Celery:
    """A Celery app on the configured broker; ``include`` names the task modules (the worker's)."""
    s = get_settings()
    app = Celery("modelpress", broker=s.broker_url, include=include or [])
    transport_options: dict[str, object] = {}
    if s.broker_url.startswith(("redis://", "rediss://")):
        # Unacked messages come back after this long: above the job time limit, or a long job
        # would be delivered a second time while it still runs.
        transport_options["visibility_timeout"] = s.job_time_limit_s + 3600
    # kombu's SQLAlchemy transport hands every transport option to create_engine, so its polling
    # interval (1 s by default: a second of latency per job in embedded mode) is set on the class.
    if s.broker_url.startswith("sqla+"):
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = 0.1
    if s.broker_key_prefix:
        transport_options["global_keyprefix"] = s.broker_key_prefix
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(q) for q in QUEUES],  # type: ignore[no-untyped-call]  # kombu leaves Queue() untyped
        task_default_queue="cpu",
        task_create_missing_queues=False,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # Backstops only: worker/limits.py stops a job at its time limit and records why; these
        # fire if that watchdog could not (the soft one leaves 30 s, the hard one kills the child).
        task_time_limit=s.job_time_limit_s + 60,
        task_soft_time_limit=s.job_time_limit_s + 30,
    )
    return app


@lru_cache(maxsize=1)
def client() -> Celery:
    """The app that sends messages (the API, the reconciler): no task modules, the worker's broker
    settings."""
    return make_celery()


def enqueue_job(job_id: str, queue: str, *, reclaim: bool = False) -> None:
    """Send the job's message. Called after the job row is committed; if the broker is down the
    job stays ``queued`` in the database and the reconciler re-sends it, so the error is logged
    rather than turned into a failed request for a job that was recorded.

    The message's ``request_id`` header carries the request id of the HTTP request that sent it,
    so the worker's log lines for the job carry it too. A send outside a request (the
    reconciler's re-sends) gets a new one, ``reconcile-<hex>``: the original is not stored with the
    job, and the job id ties both sends' lines together."""
    rid = current_request_id() or f"reconcile-{new_request_id()}"
    with log_context(request_id=rid, job_id=job_id):
        try:
            client().send_task(
                TASK_RUN_JOB,
                args=[job_id],
                queue=queue,
                headers={"request_id": rid},
                retry=True,
                priority=PRIORITY_RECLAIM if reclaim else PRIORITY_NORMAL,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception:
            log.exception("could not enqueue job %s; it stays queued for the reconciler", job_id)
        else:
            log.info(
                "job %s: message sent to queue %s%s",
                job_id,
                queue,
                " (reclaimed: ahead of queued jobs)" if reclaim else "",
            )
