"""The reconciler: the job rows are the truth, messages can be lost (a worker SIGKILLed while
holding an unacked message on the SQLite transport, a broker restarted without persistence, a send
that failed after the row committed). Every worker runs this loop in a thread of its main process;
``modelpress reconcile --once`` runs one pass."""

from __future__ import annotations

import logging
import threading

from core.config import get_settings
from core.db import get_sessionmaker
from core.jobs import repository as jobs_repo
from core.queue import enqueue_job
from core.storage import Storage, get_storage

log = logging.getLogger("modelpress.reconcile")


def reconcile_once() -> list[str]:
    """Re-send the messages of stale jobs; return their ids. A job whose attempt's lease expired
    (its worker died: the lease is renewed every few seconds while it lives, worker/heartbeat.py)
    is re-sent at once and ahead of queued jobs, and again every ``MODELPRESS_RECLAIM_RESEND_S``
    while no worker claims it; a queued one after ``MODELPRESS_REQUEUE_AFTER_S``.

    Poison jobs are failed here first, not re-sent: a job whose lease expired (or that is queued)
    after ``MODELPRESS_MAX_ATTEMPTS`` attempts gets ``too_many_attempts`` at once, without waiting
    for ``MODELPRESS_REQUEUE_AFTER_S`` (its lease expiry already says the last worker died), so it
    does not sit in ``running`` until someone looks; what its dead attempts stored is deleted.
    Re-sending it would also end the same way: a worker's ``claim`` refuses it and ``give_up``
    fails it; both paths are the same compare-and-set, so whichever comes first acts and the
    other does nothing."""
    settings = get_settings()
    with get_sessionmaker()() as s:
        given_up = jobs_repo.give_up_exhausted(s, settings.max_attempts)
        taken = jobs_repo.take_stale(s, settings.requeue_after_s, settings.reclaim_resend_s)
    for job_id in given_up:
        log.error(
            "job %s: failed with too_many_attempts (its worker died %d times; not re-sent)",
            job_id,
            settings.max_attempts,
        )
        drop_artifacts(get_storage(), job_id)
    for job_id, queue, reclaim in taken:
        if reclaim:
            log.warning(
                "job %s: its attempt's lease expired (the worker died); re-sending it ahead of queued jobs", job_id
            )
        else:
            log.warning(
                "job %s: re-sending its message (queued, last sent over %d s ago)", job_id, settings.requeue_after_s
            )
        enqueue_job(job_id, queue, reclaim=reclaim)
    return [job_id for job_id, _, _ in taken]


def drop_artifacts(storage: Storage, job_id: str) -> None:
    """Delete what the dead attempts of a job given up as poison stored (it keeps no artifact)."""
    try:
        storage.delete_prefix(f"artifacts/{job_id}")
    except Exception:  # noqa: BLE001 - storage unreachable: the files stay, the job's state is right
        log.exception("job %s: could not delete its dead attempts' artifacts", job_id)


def start_background(stop: threading.Event) -> threading.Thread:
    """A pass now (a worker that starts, maybe in place of one that died, looks at once), then
    every ``MODELPRESS_RECONCILE_INTERVAL_S``."""
    interval = get_settings().reconcile_interval_s

    def loop() -> None:
        while True:
            try:
                reconcile_once()
            except Exception:  # a database or broker outage: try again next round
                log.exception("reconcile pass failed")
            if stop.wait(interval):
                return

    t = threading.Thread(target=loop, name="modelpress-reconciler", daemon=True)
    t.start()
    return t
