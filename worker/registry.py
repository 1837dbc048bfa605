"""The worker registry: which workers run, which queues they serve, on which device.

Every worker main process adds its row to ``workers`` (id ``<hostname>:<pid>``) when Celery says
it is ready, renews ``last_seen_at`` every ``MODELPRESS_RECONCILE_INTERVAL_S`` from a thread, and
deletes the row when it shuts down cleanly. A row not renewed for ``LIVE_INTERVALS`` intervals is
a worker that died or was cut off; live workers delete rows unseen for ``FORGET_AFTER``.

The reads (who is live; ``GET /v1/workers``; whether a queued GPU job has a worker to wait for) are
in core/workers.py: the API uses them too. Only :func:`device` imports torch, and only worker
processes call it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from sqlalchemy import delete

from core.config import get_settings
from core.db import get_sessionmaker
from core.tables import Worker, utcnow
from core.workers import FORGET_AFTER

if TYPE_CHECKING:
    import torch

log = logging.getLogger("modelpress.registry")


def available_runtimes() -> list[str]:
    """The optional runtimes installed here (core/exports.OPTIONAL_RUNTIMES), found without
    importing them: the API refuses a job whose output needs one no live worker has."""
    import importlib.util

    from core.exports import OPTIONAL_RUNTIMES

    return sorted(m for m in OPTIONAL_RUNTIMES if importlib.util.find_spec(m) is not None)


def device() -> torch.device:
    """The device this worker computes on: the first visible CUDA device when there is one (pick
    it per process with ``CUDA_VISIBLE_DEVICES``), else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe(dev: torch.device) -> str:
    """``cpu``, or ``cuda:<index> (<device name>)``."""
    if dev.type != "cuda":
        return dev.type
    import torch

    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


# --- this worker -------------------------------------------------------------------------------


class Registration:
    """This process's row: written when the worker is ready and at every renewal (re-added if it
    went missing), deleted at a clean shutdown."""

    def __init__(self, queues: list[str], device: str) -> None:
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.id = f"{self.hostname}:{self.pid}"
        self.queues = sorted(queues)
        self.device = device
        self.runtimes = available_runtimes()
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        with get_sessionmaker()() as s:
            s.merge(
                Worker(
                    id=self.id,
                    hostname=self.hostname,
                    pid=self.pid,
                    queues=self.queues,
                    device=self.device,
                    runtimes=self.runtimes,
                    started_at=self.started_at,
                    last_seen_at=utcnow(),
                )
            )
            s.execute(delete(Worker).where(Worker.last_seen_at < utcnow() - FORGET_AFTER))
            s.commit()

    def start(self) -> None:
        interval = get_settings().reconcile_interval_s

        def loop() -> None:
            while True:
                try:
                    self.beat()
                except Exception:  # a database outage: the next renewal tries again
                    log.exception("worker %s: could not renew its registry row", self.id)
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=loop, name="modelpress-registry", daemon=True)
        self._thread.start()
        log.info(
            "worker %s registered: queues %s, device %s, optional runtimes: %s",
            self.id,
            ",".join(self.queues),
            self.device,
            ", ".join(self.runtimes) or "none",
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with get_sessionmaker()() as s:
                s.execute(delete(Worker).where(Worker.id == self.id))
                s.commit()
        except Exception:  # the row ages out of "live" on its own
            log.exception("worker %s: could not remove its registry row", self.id)
