"""Leases on real processes, on a stack with short leases (4 s, renewed every 0.7 s; reconciler
every second) so that each case takes seconds; tests/test_chaos.py measures recovery at the default
settings. The job lease's heartbeat comes from a keeper process that lives exactly as long as the
job's process (worker/heartbeat.py):

* a slow but live job keeps its job: its process SIGSTOPped (nothing of it runs, as in the longest
  native step that holds the GIL) for 3x the lease, while the reconciler looks every second: the
  lease is renewed all along, nothing is re-sent, and the job finishes as attempt 1;
* a dead one does not: the job process SIGKILLed, its keeper ends the lease on its way out (gone
  within a second) and the job is claimed again (attempt 2) within seconds, then succeeds;
* the job process and its keeper SIGKILLed together (a lost host): the job is claimed again once
  the lease ran out, within lease + reconcile interval;
* the keeper alone SIGKILLed: the job's process renews its lease from a thread and finishes.

Poison: a job whose pool process is SIGKILLed every time it runs it (as an OOM killer would) is
failed with ``too_many_attempts`` after MODELPRESS_MAX_ATTEMPTS (3) attempts; the worker lives on.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.chaos_util import children, job_row, keeper_of, kill_stack, pid_alive
from tests.helpers import query, upload_dir, wait_job
from tests.servers import private_database

# xdist (make test, --dist loadgroup): the modules that kill processes or servers and bound the
# recovery time share one group, so they run one after another on one worker, never two at once
# (tests/conftest.py, _schedule_for_xdist).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("kills")]

LEASE_S = 4
RECONCILE_S = 1
MAX_ATTEMPTS = 3
# A report with many timed passes: long enough to be caught running.
SLOW = {
    "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
    "evaluation": {"runs": 100, "warmup": 20, "seq_len": 64, "batch_size": 8},
}


@pytest.fixture(scope="module")
def beat(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with private_database() as db:
        st = kill_stack(
            db,
            tmp_path_factory.mktemp("heartbeat"),
            job_lease_s=str(LEASE_S),
            requeue_after_s="2",
            reconcile_interval_s=str(RECONCILE_S),
            max_attempts=str(MAX_ATTEMPTS),
        )
        yield st
        st.service.stop()


def _worker_main(stack) -> int:
    return [p for p in stack.service.procs if p is not stack.service.api][-1].pid


def _running_job_process(stack, job_id: str, timeout: float = 120) -> int:
    """The pool child once it runs the job past its start (a step or the evaluation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = job_row(stack, job_id)
        kids = children(_worker_main(stack))
        if row["status"] == "running" and row["stage"] not in ("starting", "loading") and kids and keeper_of(kids[0]):
            return kids[0]
        assert row["status"] in ("queued", "running"), row
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} was not seen running: {job_row(stack, job_id)}")


def _submit_slow(stack, tiny) -> tuple:  # noqa: ANN001
    """A client, the uploaded gpt2-big model and a SLOW job on it (queued, not yet seen running)."""
    c = stack.client()
    model = upload_dir(c, tiny["gpt2-big"]).json()["id"]
    job_id = c.post("/v1/jobs", json={"model_id": model, **SLOW}).json()["id"]
    return c, model, job_id


def _start_slow(stack, tiny) -> tuple:  # noqa: ANN001
    """A SLOW job seen running: the client, its id, its job process and that process's keeper."""
    c, _model, job_id = _submit_slow(stack, tiny)
    child = _running_job_process(stack, job_id)
    return c, job_id, child, keeper_of(child)


def test_a_stopped_but_live_job_process_keeps_its_lease(beat, tiny):
    c, job_id, child, _keeper = _start_slow(beat, tiny)
    sent_before = job_row(beat, job_id)["enqueued_at"]
    os.kill(child, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * LEASE_S:
            row = job_row(beat, job_id)
            assert row["status"] == "running" and row["attempt"] == 1, row
            # Renewed every LEASE_S / 6 s: never more than a few beats behind.
            left = (row["lease_expires_at"] - datetime.now(UTC)).total_seconds()
            assert left > LEASE_S / 3, (left, row)
            time.sleep(0.5)
    finally:
        os.kill(child, signal.SIGCONT)
    assert job_row(beat, job_id)["enqueued_at"] == sent_before, "the reconciler re-sent a live job"
    done = wait_job(c, job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done


def _reclaimed_after(stack, job_id: str, since: float, limit_s: float) -> float:
    """Seconds from ``since`` until the job's attempt 2 is claimed (at most ``limit_s``)."""
    while job_row(stack, job_id)["attempt"] < 2:
        assert time.monotonic() - since < limit_s, job_row(stack, job_id)
        time.sleep(0.05)
    return time.monotonic() - since


def test_a_killed_job_process_takes_its_keeper_along_which_ends_the_lease_at_once(beat, tiny):
    c, job_id, child, keeper = _start_slow(beat, tiny)
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    while pid_alive(keeper):
        assert time.monotonic() - killed < 2, "the keeper outlived its job process"
        time.sleep(0.02)
    # It ended the lease on its way out: claimable now, not LEASE_S after the last renewal; the
    # reconciler's next pass (or Celery's requeue of the lost task) starts attempt 2.
    assert job_row(beat, job_id)["lease_expires_at"] <= datetime.now(UTC)
    took = _reclaimed_after(beat, job_id, killed, RECONCILE_S + 8)
    done = wait_job(c, job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    print(f"\njob process killed: attempt 2 claimed {took:.1f} s later")


def test_a_job_whose_process_and_keeper_die_together_is_reclaimed_when_the_lease_runs_out(beat, tiny):
    """A lost host, a `docker kill`: nobody says the job died; its lease does."""
    c, job_id, child, keeper = _start_slow(beat, tiny)
    os.kill(keeper, signal.SIGKILL)
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    took = _reclaimed_after(beat, job_id, killed, LEASE_S + RECONCILE_S + 8)
    # Not before the lease ran out (renewed every LEASE_S / 6 s before the kill).
    assert took >= LEASE_S * 5 / 6 - 0.5, took
    done = wait_job(c, job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    print(f"\njob process and keeper killed: attempt 2 claimed {took:.1f} s later (lease {LEASE_S} s)")


def test_a_job_whose_keeper_dies_keeps_its_lease_from_a_thread(beat, tiny):
    c, job_id, child, keeper = _start_slow(beat, tiny)
    os.kill(keeper, signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2 * LEASE_S:
        row = job_row(beat, job_id)
        if row["status"] != "running":
            break
        assert row["attempt"] == 1, row
        time.sleep(0.5)
    done = wait_job(c, job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(beat, tiny):
    chaos = beat
    c, model, poison = _submit_slow(chaos, tiny)  # slow enough to be caught running
    main = [p for p in chaos.service.procs if p is not chaos.service.api][-1]
    deadline = time.monotonic() + 60
    while not children(main.pid):
        assert time.monotonic() < deadline, "the worker did not start its pool"
        time.sleep(0.2)
    killed: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ((status, attempt),) = query(chaos, "SELECT status, attempt FROM jobs WHERE id = %s", poison)
        if status in ("succeeded", "failed", "canceled"):
            break
        if status == "running" and attempt not in killed:
            for child in children(main.pid):
                os.kill(child, signal.SIGKILL)  # the OOM killer's verdict, every time it runs
            killed.append(attempt)
        time.sleep(0.05)
    job = c.get(f"/v1/jobs/{poison}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "too_many_attempts", job
    assert killed == list(range(1, MAX_ATTEMPTS + 1)) and job["attempt"] == MAX_ATTEMPTS, (killed, job)
    # The worker's main process survived every kill of its child and serves the next job.
    assert main.poll() is None
    ok = c.post(
        "/v1/jobs",
        json={
            "model_id": model,
            "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}],
            "evaluation": {"enabled": False},
        },
    ).json()
    assert wait_job(c, ok["id"], timeout=60)["status"] == "succeeded"


def test_the_keeper_renews_and_ends_leases_on_sqlite(tmp_path):
    """Embedded mode has no Redis and keeps its jobs in SQLite: the keeper of a (non-torch) job
    process renews two leases there (a threads pool holds several), and ends both when that process
    is SIGKILLed."""
    import subprocess
    import sys
    import uuid
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from core.db import make_engine
    from core.tables import Job, Tenant
    from tests.helpers import MODELPRESS

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")},
        "MODELPRESS_MODE": "embedded",
        "MODELPRESS_DATA_DIR": str(tmp_path),
    }
    subprocess.run([MODELPRESS, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    engine = make_engine(f"sqlite:///{tmp_path / 'modelpress.sqlite3'}")
    jobs = [str(uuid.uuid4()) for _ in range(2)]
    start = datetime.now(UTC)
    with Session(engine) as s:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
        s.add(tenant)
        s.flush()
        s.add_all(
            [
                Job(
                    id=j,
                    tenant_id=tenant.id,
                    steps=[],
                    status="running",
                    attempt=1,
                    lease_expires_at=start + timedelta(seconds=LEASE_S),
                )
                for j in jobs
            ]
        )
        s.commit()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom worker.heartbeat import keeper\nk = keeper()\n"
            f"for j in {jobs!r}: k.hold(j, 1, {LEASE_S})\nprint(k.pid, flush=True)\ntime.sleep(600)\n",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        keeper_pid = int(holder.stdout.readline())

        def leases() -> list:
            with Session(engine) as s:
                return [s.get(Job, j).lease_expires_at for j in jobs]

        time.sleep(2 * LEASE_S)  # past the first lease: renewed all along
        assert all(lease > datetime.now(UTC) + timedelta(seconds=LEASE_S / 3) for lease in leases()), leases()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 5
        while pid_alive(keeper_pid) or any(lease > datetime.now(UTC) for lease in leases()):
            assert time.monotonic() < deadline, ("the keeper did not end the leases", leases())
            time.sleep(0.05)
    finally:
        if holder.poll() is None:
            holder.kill()
        engine.dispose()
