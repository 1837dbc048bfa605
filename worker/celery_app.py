"""The worker's Celery application: the broker settings of core/queue.py, plus the task modules
(``include``), which only worker processes import. The API never imports this module: it sends
tasks by name through core.queue's client.
"""

from __future__ import annotations

from celery.signals import setup_logging

from core.logs import configure_logging
from core.queue import make_celery

celery_app = make_celery(include=["worker.tasks"])


@setup_logging.connect
def _our_logging(**_kw: object) -> None:
    """Celery configures no logging of its own when this signal has a receiver: every worker
    process (pool children included) logs through core.logs's root handler, in
    MODELPRESS_LOG_FORMAT, like the API."""
    configure_logging()
