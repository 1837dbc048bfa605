"""The reconciler: the job rows are the truth, messages can be lost (a worker SIGKILLed while
holding an unacked message on the SQLite transport, a broker restarted without persistence, a send
that failed after the row committed). Every worker runs this loop in a thread of its main process;
``modelpress reconcile --once`` runs one pass."""

from __future__ import annotations

import logging
import threading

from app.config import get_settings
from app.db import get_sessionmaker
from app.jobs import repository as jobs_repo
from worker.celery_app import enqueue_job

log = logging.getLogger("modelpress.reconcile")


def reconcile_once() -> list[str]:
    """Re-send the messages of stale jobs; return their ids."""
    settings = get_settings()
    with get_sessionmaker()() as s:
        taken = jobs_repo.take_stale(s, settings.requeue_after_s)
    for job_id, queue in taken:
        log.warning("job %s: re-sending its message (queued or lease expired, last sent over %d s ago)", job_id, settings.requeue_after_s)
        enqueue_job(job_id, queue)
    return [job_id for job_id, _ in taken]


def start_background(stop: threading.Event) -> threading.Thread:
    interval = get_settings().reconcile_interval_s

    def loop() -> None:
        while not stop.wait(interval):
            try:
                reconcile_once()
            except Exception:  # a database or broker outage: try again next round
                log.exception("reconcile pass failed")

    t = threading.Thread(target=loop, name="modelpress-reconciler", daemon=True)
    t.start()
    return t
