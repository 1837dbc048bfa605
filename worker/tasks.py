"""Celery tasks: thin. A task takes a job id, and the pipeline re-reads everything from the
database, so running a message twice is harmless (the claim lets only one attempt through)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from celery import Task
from celery.exceptions import Reject
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_ready, worker_shutdown

from core import logs
from core.queue import QUEUES, TASK_RUN_JOB
from worker import budget, pipeline, registry  # imports torch once, when the worker starts
from worker.celery_app import celery_app

log = logging.getLogger("modelpress.worker")

_stop_reconciler = threading.Event()
_stop_webhooks = threading.Event()
_stop_sweeper = threading.Event()


class _Backoff:
    """1, 2, 4... seconds, at most ``cap``, until reset (per process: a pool child runs one task at
    a time)."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first, self.cap, self.n = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.n)
        self.n += 1
        return delay

    def reset(self) -> None:
        self.n = 0


_claim_backoff = _Backoff()
# task id -> the token that restores the log context when the task is done.
_log_tokens: dict[str, contextvars.Token] = {}


@celery_app.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> None:
    # A job whose plan is over this worker's budget is not claimed (worker/budget.py says what
    # becomes of it); after a job it ran, its measured throughput goes to the registry for later
    # plans (not after a duplicate message for a job another task already ran: counted once).
    try:
        admitted = budget.admit(job_id)
    except Exception:  # e.g. the database is down: the claim (which retries nothing) decides
        log.exception("job %s: could not check the job's plan against this worker's budget", job_id)
        admitted = True
    if not admitted:
        return
    try:
        ran = pipeline.run_job(job_id)
    except pipeline.ClaimUnavailable as e:
        # The database is down: back to the queue, after a pause that grows while it stays down
        # (each message taken meanwhile waits here, instead of being acknowledged and lost until
        # the reconciler's requeue, MODELPRESS_REQUEUE_AFTER_S later).
        delay = _claim_backoff.next()
        log.warning("job %s: could not claim it (%s); back to the queue in %.0f s", job_id, e, delay)
        time.sleep(delay)
        raise Reject(f"database unavailable: {e}", requeue=True) from e
    _claim_backoff.reset()
    if not ran:
        return
    try:
        budget.record_throughput(job_id)
    except Exception:  # a figure for estimates only: never fails the task
        log.exception("job %s: could not record the worker's throughput", job_id)


def registration() -> budget.BudgetRegistration | None:
    """This process's registry row, in a worker's main process (None in a prefork pool child).
    worker/budget.py holds it, so that module need not import this one."""
    return budget.registration()


@task_prerun.connect
def _bind_log_context(task_id: str, task: Task, args: tuple = (), **_kw: object) -> None:
    """Every log line of a job (the pipeline's and Celery's own "succeeded in" line) carries its
    job id and the request id that came in the message's ``request_id`` header."""
    if task.name == TASK_RUN_JOB:
        rid = logs.sane_request_id(getattr(task.request, "request_id", None))
        _log_tokens[task_id] = logs.bind(request_id=rid, job_id=args[0] if args else None)


@task_postrun.connect
def _unbind_log_context(task_id: str, **_kw: object) -> None:
    token = _log_tokens.pop(task_id, None)
    if token is not None:
        logs.unbind(token)


@worker_ready.connect
def _on_ready(**_kw: object) -> None:
    """In the worker's main process: start the reconciler, the sweeper (worker/sweep.py: its first
    pass removes what killed job processes left) and the webhook dispatcher, and register in the
    worker registry (the queues this worker consumes, and its device)."""
    from core.reconcile import start_background
    from worker import sweep, webhooks

    start_background(_stop_reconciler)
    sweep.start_background(_stop_sweeper)
    webhooks.start_background(_stop_webhooks)
    consumed = celery_app.amqp.queues.consume_from  # None: no -Q, every queue
    reg = budget.BudgetRegistration(sorted(consumed or QUEUES), registry.describe(registry.device()))
    budget.set_registration(reg)
    reg.start()


@worker_shutdown.connect
def _on_shutdown(**_kw: object) -> None:
    _stop_reconciler.set()
    _stop_webhooks.set()
    _stop_sweeper.set()
    reg = budget.registration()
    if reg is not None:
        reg.stop()


@worker_process_init.connect
def _fresh_db_pool(**_kw: object) -> None:
    """A pool child forked after the main process opened database connections (its reconciler)
    must not reuse those sockets: drop the inherited pool without closing the parent's."""
    from core.db import get_engine

    get_engine().dispose(close=False)
