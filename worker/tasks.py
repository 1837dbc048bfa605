"""Celery tasks: thin. A task takes a job id, and the pipeline re-reads everything from the
database, so running a message twice is harmless (the claim lets only one attempt through)."""

from __future__ import annotations

import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from worker import pipeline  # imports torch once, when the worker starts
from worker.celery_app import TASK_RUN_JOB, celery_app

_stop_reconciler = threading.Event()


@celery_app.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> None:
    pipeline.run_job(job_id)


@worker_ready.connect
def _start_reconciler(**_kw: object) -> None:
    from worker.reconcile import start_background

    start_background(_stop_reconciler)


@worker_shutdown.connect
def _stop_reconciler_loop(**_kw: object) -> None:
    _stop_reconciler.set()


@worker_process_init.connect
def _fresh_db_pool(**_kw: object) -> None:
    """A pool child forked after the main process opened database connections (its reconciler)
    must not reuse those sockets: drop the inherited pool without closing the parent's."""
    from app.db import get_engine

    get_engine().dispose(close=False)
