"""Celery tasks: thin. A task takes a job id, and the pipeline re-reads everything from the
database, so running a message twice is harmless (the claim lets only one attempt through)."""

from __future__ import annotations

from worker import pipeline  # imports torch once, when the worker starts
from worker.celery_app import TASK_RUN_JOB, celery_app


@celery_app.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> None:
    pipeline.run_job(job_id)
