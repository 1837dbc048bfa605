"""Per-job time and memory limits: a watchdog thread next to the running job.

Why a watchdog and not Celery's time limits or ``RLIMIT_AS``: Celery's soft limit is a signal
that only lands between bytecodes of the main thread and its hard limit kills the pool child
without a word, so the job would be run again until it is a poison job; an address-space limit
breaks torch, which reserves far more virtual memory than it touches. The watchdog samples the
process's resident memory and the job's wall time every ``POLL_S`` and, over a limit:

1. raises ``TimeLimitExceeded`` / ``MemoryLimitExceeded`` in the job's thread
   (``PyThreadState_SetAsyncExc``): the pipeline records the failure with its own error code,
   frees the job's memory and the worker takes the next job;
2. if the job does not stop within ``GRACE_S`` (a long native call holds the thread) or its memory
   keeps growing past twice the limit, it records the failure itself (fenced by the attempt
   number, like every worker write) and, in a prefork pool child, SIGKILLs its own process: the
   Celery main process survives, forks a fresh child, and the redelivered message finds the job
   finished. A solo-pool worker (the GPU pool) is the worker's main process, so there the
   watchdog records the failure but does not kill: the job's attempt is fenced off and its late
   writes are refused.

The memory limit counts the job's own growth of the process's RSS above what it held when the
job started: the imported libraries belong to the worker, not to the job.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from celery.signals import worker_process_init

log = logging.getLogger("modelpress.limits")

POLL_S = 0.1
GRACE_S = 5.0
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Set in prefork pool children: only there may the watchdog kill its own process.
_in_pool_child = False


@worker_process_init.connect
def _mark_pool_child(**_kw: object) -> None:
    global _in_pool_child
    _in_pool_child = True


class LimitExceeded(BaseException):
    """A BaseException, so that no ``except Exception`` in a method or a library swallows it."""

    code = "limit"


class TimeLimitExceeded(LimitExceeded):
    code = "time_limit"


class MemoryLimitExceeded(LimitExceeded):
    code = "memory_limit"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class Watchdog:
    """Watches the calling thread's job from ``start()`` to ``stop()``.

    ``on_hard_limit(code, message)`` is called from the watchdog thread when the job did not stop
    by itself; it must record the failure (the process may be killed right after)."""

    def __init__(self, time_limit_s: float, memory_limit_bytes: int, on_hard_limit: Callable[[str, str], None]) -> None:
        self.time_limit_s = time_limit_s
        self.memory_limit_bytes = memory_limit_bytes
        self.on_hard_limit = on_hard_limit
        self.fired: LimitExceeded | None = None
        self.message = ""
        self.peak_growth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._target = 0
        self._lock = threading.Lock()

    def start(self) -> Watchdog:
        self._target = threading.get_ident()
        self._baseline = rss_bytes()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="modelpress-limits", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Called by the job's thread when the job is done (also when it failed). After this no
        limit exception can arrive: one raised but not yet delivered is withdrawn."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        log.info(
            "job memory growth peaked at %.1f MiB over %.1f s", self.peak_growth / 2**20, time.monotonic() - self._t0
        )
        with self._lock:
            _async_raise(self._target, None)

    def _over(self, growth: int, elapsed: float) -> tuple[type[LimitExceeded], str] | None:
        if self.memory_limit_bytes and growth > self.memory_limit_bytes:
            return MemoryLimitExceeded, (
                f"the job used {growth / 2**20:.0f} MiB, over its memory limit of "
                f"{self.memory_limit_bytes / 2**20:.0f} MiB (MODELPRESS_JOB_MEMORY_LIMIT_MB)"
            )
        if elapsed > self.time_limit_s:
            return (
                TimeLimitExceeded,
                f"the job ran past its time limit of {self.time_limit_s:g} s (MODELPRESS_JOB_TIME_LIMIT_S)",
            )
        return None

    def _run(self) -> None:
        fired_at = 0.0
        while not self._stop.wait(POLL_S):
            growth = rss_bytes() - self._baseline
            self.peak_growth = max(self.peak_growth, growth)
            now = time.monotonic()
            if self.fired is None:
                over = self._over(growth, now - self._t0)
                if over is None:
                    continue
                cls, self.message = over
                self.fired = cls(self.message)
                fired_at = now
                log.warning("%s; stopping the job", self.message)
                with self._lock:
                    if not self._stop.is_set():
                        _async_raise(self._target, cls)
                continue
            runaway = isinstance(self.fired, MemoryLimitExceeded) and growth > 2 * self.memory_limit_bytes
            if runaway or now - fired_at > GRACE_S:
                log.error(
                    "the job did not stop within %.0f s of its limit; recording the failure%s",
                    now - fired_at,
                    " and killing this pool process" if _in_pool_child else "",
                )
                try:
                    self.on_hard_limit(self.fired.code, self.message)
                finally:
                    if _in_pool_child:
                        os.kill(os.getpid(), signal.SIGKILL)
                return
