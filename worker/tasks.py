"""Celery tasks: thin. A task takes a job id, and the pipeline re-reads everything from the
database, so running a message twice is harmless (the claim lets only one attempt through)."""

from __future__ import annotations

import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from worker import pipeline, registry  # imports torch once, when the worker starts
from worker.celery_app import QUEUES, TASK_RUN_JOB, celery_app

_stop_reconciler = threading.Event()
_registration: registry.Registration | None = None


@celery_app.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> None:
    pipeline.run_job(job_id)


@worker_ready.connect
def _on_ready(**_kw: object) -> None:
    """In the worker's main process: start the reconciler and register in the worker registry
    (the queues this worker consumes, and its device)."""
    global _registration
    from worker.reconcile import start_background

    start_background(_stop_reconciler)
    consumed = celery_app.amqp.queues.consume_from  # None: no -Q, every queue
    _registration = registry.Registration(sorted(consumed or QUEUES), registry.describe(registry.device()))
    _registration.start()


@worker_shutdown.connect
def _on_shutdown(**_kw: object) -> None:
    _stop_reconciler.set()
    if _registration is not None:
        _registration.stop()


@worker_process_init.connect
def _fresh_db_pool(**_kw: object) -> None:
    """A pool child forked after the main process opened database connections (its reconciler)
    must not reuse those sockets: drop the inherited pool without closing the parent's."""
    from app.db import get_engine

    get_engine().dispose(close=False)
