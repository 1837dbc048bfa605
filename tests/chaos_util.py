"""Helpers of the tests that kill processes (test_chaos, test_heartbeat, test_leftovers): stacks
of their own, workers with a data folder each (as on separate hosts), and the processes of a
worker found through /proc."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

from tests.conftest import Stack, _cluster_env
from tests.helpers import MODELPRESS, Service, query


def kill_stack(pg_database: str, tmp: Path, worker: bool = True, **env: str) -> Stack:
    """A cluster stack of its own (its own Redis key prefix and data folder) with extra settings."""
    full = {
        **_cluster_env(pg_database, tmp, f"mptest-kill-{uuid.uuid4().hex[:8]}:"),
        **{f"MODELPRESS_{k.upper()}": v for k, v in env.items()},
    }
    svc = Service(full, tmp, worker=worker)
    svc.cli("migrate")
    key = svc.cli("keys", "create", "--tenant", f"kill-{uuid.uuid4().hex[:6]}")
    svc.start()
    return Stack("cluster", svc, key, key, tmp, pg_database)


class Worker:
    """A worker process with a data folder of its own (its scratch, as on a host of its own) and
    the stack's shared storage."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack, self.name = stack, name
        self.data_dir = stack.data_dir / f"host-{name}"
        self.proc: subprocess.Popen | None = None

    @property
    def tmp(self) -> Path:
        return self.data_dir / "tmp"

    def start(self) -> Worker:
        svc = self.stack.service
        env = {
            **svc.env,
            "MODELPRESS_DATA_DIR": str(self.data_dir),
            "MODELPRESS_STORAGE_URL": svc.env.get("MODELPRESS_STORAGE_URL") or str(self.stack.data_dir / "storage"),
        }
        log = (self.stack.data_dir / f"worker-{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [MODELPRESS, "worker", "--concurrency", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        svc.procs.append(self.proc)  # stopped with the stack
        return self

    def pool_child(self) -> int | None:
        """The live pool child (a killed one its parent has not reaped yet is listed as a zombie)."""
        kids = [k for k in children(self.proc.pid) if pid_alive(k)] if self.proc else []
        return kids[0] if kids else None

    def wait_ready(self, timeout: float = 90) -> None:
        """Until the main process has forked its pool child (it is consuming)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pool_child():
                return
            assert self.proc.poll() is None, f"worker {self.name} exited"
            time.sleep(0.2)
        raise AssertionError(f"worker {self.name} did not start its pool")

    def scratch(self) -> list[tuple[str, int]]:
        """(job id, attempt) of the job folders in this worker's scratch."""
        out = []
        for p in self.tmp.glob("job-*") if self.tmp.is_dir() else []:
            stem = p.name[len("job-") :].split(".", 1)[0]
            job_id, _, attempt = stem.rpartition("-")
            out.append((job_id, int(attempt)))
        return out


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def keeper_of(pid: int) -> int | None:
    """The lease keeper process (worker/heartbeat.py) of a job process."""
    return next((c for c in children(pid) if "worker.heartbeat" in cmdline(c)), None)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def job_row(stack: Stack, job_id: str) -> dict:
    (row,) = query(
        stack,
        "SELECT status, attempt, lease_expires_at, enqueued_at, progress_stage, started_at FROM jobs WHERE id = %s",
        job_id,
    )
    return dict(zip(("status", "attempt", "lease_expires_at", "enqueued_at", "stage", "started_at"), row, strict=True))


def attempt_started_at(stack: Stack, job_id: str, attempt: int):  # noqa: ANN201 - a datetime or None
    """When the job's ``attempt`` was claimed: its first status event with that attempt."""
    rows = query(
        stack,
        "SELECT min(created_at) FROM job_events WHERE job_id = %s AND type = 'status'"
        " AND (data->>'attempt')::int = %s AND data->>'status' = 'running'",
        job_id,
        attempt,
    )
    return rows[0][0]
