"""The job lease's heartbeat, from a small process that lives exactly as long as the job's process.

A running attempt holds its job by a lease (``jobs.lease_expires_at``, fenced by the attempt
number: core/jobs/repository.py). The lease is renewed every ``MODELPRESS_JOB_LEASE_S`` / 6 seconds
(5 s at the default 30 s) by a *keeper*: this module run as ``python -m worker.heartbeat <pid>``, a
child of the process that runs jobs (a Celery prefork pool child, or the worker process itself with
the solo pool). It never imports torch (~50 MB resident, started once per job process, with its
first job).

* It dies with the job's process, and says so. It waits on a pidfd of its parent: when the job's
  process exits (SIGKILLed, OOM-killed, or taken down with its worker's main process: pool
  children die with it), the keeper ends the attempt's lease at once (a fenced UPDATE) and exits,
  so the reconciler's next pass re-sends the job, seconds after the kill. When the keeper dies
  too (the whole worker killed, the host lost), the renewals stop and the job is claimable again
  ``job_lease_s`` after the last one.
* It does not share the job's interpreter: a long native step that holds the GIL (or a job
  process that is not scheduled at all for a while) does not stop the renewals, so a slow but live
  job keeps its lease. A job that hangs for good is bounded by ``MODELPRESS_JOB_TIME_LIMIT_S``
  (worker/limits.py, and Celery's hard time limit behind it), not by its lease.

The job process tells its keeper over a pipe which attempts it holds (``hold <job> <attempt>
<lease_s>``; several at once in a threads pool) and when one is done (``release <job>
<attempt>``). A renewal is the fenced UPDATE of ``jobs_repo.heartbeat``: once the attempt lost
its job (another attempt claimed it, or it ended) the keeper stops renewing it. When a keeper
cannot be started, or has died, a thread of the job's process renews the lease instead
(:func:`renew_from_thread`), and the next job starts a new keeper.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time

log = logging.getLogger("modelpress.heartbeat")

# Renewals per lease: five may fail in a row (a database blip) before the lease runs out.
BEATS_PER_LEASE = 6


def beat_interval(lease_s: float) -> float:
    return max(0.5, lease_s / BEATS_PER_LEASE)


# --- the job's process -------------------------------------------------------------------------


class LeaseKeeper:
    """The job process's handle on its keeper process (started on first use, in this process)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._owner_pid = 0
        self._lock = threading.Lock()
        self._held: dict[tuple[str, int], float] = {}  # told again to a keeper started anew

    def alive(self) -> bool:
        return self._proc is not None and self._owner_pid == os.getpid() and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.alive() else None

    def _ensure(self) -> bool:
        if self.alive():
            return True
        if self._proc is not None and self._owner_pid == os.getpid():
            self._proc.poll()  # reap a dead keeper
        try:
            # stdout/stderr are inherited: the keeper logs where the worker does.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "worker.heartbeat", str(os.getpid())], stdin=subprocess.PIPE, close_fds=True
            )
        except OSError:
            log.exception("could not start the lease keeper process; leases are renewed from a thread")
            self._proc = None
            return False
        self._owner_pid = os.getpid()
        # A keeper started after another died: it holds what this process still holds.
        lines = "".join(f"hold {j} {a} {lease}\n" for (j, a), lease in self._held.items())
        return self._write(lines) if lines else True

    def _write(self, lines: str) -> bool:
        try:
            self._proc.stdin.write(lines.encode())  # type: ignore[union-attr]
            self._proc.stdin.flush()  # type: ignore[union-attr]
            return True
        except OSError:  # it died between the check and the write
            return False

    def hold(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Renew (job, attempt)'s lease from now on; False if no keeper runs (renew it yourself)."""
        with self._lock:
            self._held[(job_id, attempt)] = lease_s
            return self._ensure() and self._write(f"hold {job_id} {attempt} {lease_s}\n")

    def release(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self._held.pop((job_id, attempt), None)
            if self.alive():
                self._write(f"release {job_id} {attempt}\n")


_keeper: LeaseKeeper | None = None


def keeper() -> LeaseKeeper:
    global _keeper
    if _keeper is None or _keeper._owner_pid not in (0, os.getpid()):  # a fork's inherited handle is not ours
        _keeper = LeaseKeeper()
    return _keeper


def renew_from_thread(
    job_id: str, attempt: int, lease_s: float, stop: threading.Event, keeper_: LeaseKeeper
) -> threading.Thread:
    """The fallback: renew from a thread of the job's process whenever its keeper is not alive."""

    def loop() -> None:
        while not stop.wait(beat_interval(lease_s)):
            if keeper_.alive():
                continue
            if not _renew(job_id, attempt, lease_s):
                return

    t = threading.Thread(target=loop, name="modelpress-lease", daemon=True)
    t.start()
    return t


def _renew(job_id: str, attempt: int, lease_s: float) -> bool:
    """One fenced renewal; False once the attempt no longer holds the job."""
    from core.db import get_sessionmaker
    from core.jobs import repository as jobs_repo

    try:
        with get_sessionmaker()() as s:
            return jobs_repo.heartbeat(s, job_id, attempt, lease_s)
    except Exception:  # the database is down: the next beat tries again
        log.warning("job %s attempt %d: lease not renewed (database unreachable)", job_id, attempt)
        return True


# --- the keeper process ------------------------------------------------------------------------


def _parent_gone(parent: int, pidfd: int | None, wait_s: float = 0.0) -> bool:
    """Whether the job's process has exited (waiting up to ``wait_s`` for it to)."""
    if pidfd is not None:
        ready, _, _ = select.select([pidfd], [], [], wait_s)
        return bool(ready) or os.getppid() != parent
    deadline = time.monotonic() + wait_s
    while os.getppid() == parent:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


Held = dict[tuple[str, int], float]  # (job id, attempt) -> lease seconds


def _end(held: Held) -> None:
    """The job's process died holding ``held``: end those leases now (fenced), so the reconciler
    re-sends the jobs at its next pass instead of after the leases would have run out."""
    if not held:
        return
    from core.db import get_sessionmaker
    from core.jobs import repository as jobs_repo

    for job_id, attempt in held:
        try:
            with get_sessionmaker()() as s:
                if jobs_repo.end_lease(s, job_id, attempt):
                    log.warning(
                        "job %s attempt %d: its process died; lease ended now, the job is claimable again",
                        job_id,
                        attempt,
                    )
        except Exception:  # the database is down: the lease runs out on its own
            log.warning(
                "job %s attempt %d: its process died; could not end its lease (it runs out on its own)", job_id, attempt
            )


class _Orders:
    """What the job's process said over the pipe: the attempts it holds now."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held: Held = {}
        self.next_beat = float("inf")
        self.closed = False
        self._buf = b""

    def read(self) -> None:
        data = os.read(self.fd, 4096)
        if not data:
            self.closed = True
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            cmd = line.decode().split()
            if len(cmd) == 4 and cmd[0] == "hold":
                self.held[(cmd[1], int(cmd[2]))] = float(cmd[3])
            elif len(cmd) == 3 and cmd[0] == "release":
                self.held.pop((cmd[1], int(cmd[2])), None)
        self.next_beat = min(self.next_beat, self._due()) if self.held else float("inf")

    def _due(self) -> float:
        return time.monotonic() + beat_interval(min(self.held.values()))

    def drain(self) -> None:
        """Everything written before the job's process died (it stays in the pipe)."""
        while not self.closed and select.select([self.fd], [], [], 0)[0]:
            self.read()

    def beat(self) -> None:
        for (job_id, attempt), lease_s in list(self.held.items()):
            if not _renew(job_id, attempt, lease_s):
                log.info("job %s attempt %d: no longer held by this attempt; lease no longer renewed", job_id, attempt)
                self.held.pop((job_id, attempt), None)
        self.next_beat = self._due() if self.held else float("inf")


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    orders = _Orders(sys.stdin.buffer.fileno())
    try:
        pidfd: int | None = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = None  # getppid() is polled every second instead

    from core.logs import configure_logging

    configure_logging()
    while True:
        wait = min(1.0, max(0.0, orders.next_beat - time.monotonic()))
        ready, _, _ = select.select([orders.fd] + ([pidfd] if pidfd is not None else []), [], [], wait)
        if os.getppid() != parent or (pidfd is not None and pidfd in ready):
            # The job's process died (maybe before this process was even running): what it held
            # last is in the pipe.
            orders.drain()
            _end(orders.held)
            return 0
        if orders.fd in ready:
            orders.read()
            if orders.closed:  # the pipe closed: the job's process is exiting (or dropped its keeper)
                if _parent_gone(parent, pidfd, wait_s=2.0):
                    _end(orders.held)
                return 0
        if orders.held and time.monotonic() >= orders.next_beat:
            orders.beat()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
