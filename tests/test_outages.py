"""Broker and database outages, on private servers (tests/servers.py) that the tests stop and
start; the machine's shared PostgreSQL and Redis are never touched.

* Redis killed mid-run and restarted empty (no persistence: every message in it is gone): every
  job still succeeds. Jobs submitted while it is down are recorded (202) and run after it returns.
* PostgreSQL stopped for 20 s: meanwhile the API answers 503 ``database_unavailable`` (never 500)
  to reads and writes, records nothing and leaves no file; afterwards every job finishes.
* A worker that takes job messages while PostgreSQL is down puts them back on the queue: the jobs
  run as soon as it returns, not after the reconciler's requeue (set to 10 minutes there).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Stack
from tests.helpers import Service, jobs_left, upload_dir, wait_job
from tests.servers import PrivatePostgres, PrivateRedis

# xdist (make test, --dist loadgroup): the modules that kill processes or servers and bound the
# recovery time share one group, so they run one after another on one worker, never two at once
# (tests/conftest.py, _schedule_for_xdist).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("kills")]

CHEAP = {"evaluation": {"enabled": False}}
# A second or so per job on the tiny GPT-2 (a few timed passes): several are queued when a
# server goes down.
SLOW = {"evaluation": {"runs": 5, "warmup": 1, "seq_len": 32, "max_samples": 4}}
PRUNE = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    pg, rd = PrivatePostgres().init(), PrivateRedis().start()
    yield pg, rd
    rd.kill()
    pg.destroy()


def _stack(
    tmp: Path, db_url: str, broker_url: str, tenant: str, *, worker: bool, requeue_after_s: int, key_prefix: str = ""
) -> Stack:
    """A cluster-mode service on the private servers, its reconciler every second."""
    env = {
        "MODELPRESS_MODE": "cluster",
        "MODELPRESS_DATABASE_URL": db_url,
        "MODELPRESS_BROKER_URL": broker_url,
        "MODELPRESS_BROKER_KEY_PREFIX": key_prefix,
        "MODELPRESS_DATA_DIR": str(tmp),
        "MODELPRESS_REQUEUE_AFTER_S": str(requeue_after_s),
        "MODELPRESS_RECONCILE_INTERVAL_S": "1",
    }
    svc = Service(env, tmp, worker=worker)
    svc.cli("migrate")
    key = svc.cli("keys", "create", "--tenant", f"{tenant}-{uuid.uuid4().hex[:6]}")
    svc.start()
    return Stack("cluster", svc, key, key, tmp, db_url)


@pytest.fixture(scope="module")
def outage(servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pg, rd = servers
    stack = _stack(tmp_path_factory.mktemp("outage"), pg.url, rd.url, "outage", worker=True, requeue_after_s=3)
    yield stack
    stack.service.stop()


def _wait_running(c: httpx.Client, ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids):
            return
        time.sleep(0.1)
    raise AssertionError("no job started")


def _count(c: httpx.Client, what: str) -> int:
    return len(c.get(f"/v1/{what}", params={"limit": 100}).json()["items"])


def _submit(c: httpx.Client, model: str, extra: dict) -> str:
    r = c.post("/v1/jobs", json={"model_id": model, "steps": PRUNE, **extra})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _running_jobs(outage, tiny, n: int) -> tuple[httpx.Client, str, list[str]]:  # noqa: ANN001
    """A client, an uploaded model and ``n`` slow jobs on it, once one of them runs."""
    c = outage.client()
    model = upload_dir(c, tiny["gpt2"]).json()["id"]
    ids = [_submit(c, model, SLOW) for _ in range(n)]
    _wait_running(c, ids)
    return c, model, ids


def test_redis_restarted_mid_run_loses_no_job(outage, servers, tiny):
    _, rd = servers
    c, model, ids = _running_jobs(outage, tiny, 8)
    rd.kill()  # every queued message is lost with it
    during = [_submit(c, model, CHEAP) for _ in range(3)]  # recorded; their messages cannot be sent
    time.sleep(3)
    rd.start()
    ids += during
    for job_id in ids:
        job = wait_job(c, job_id, timeout=240)
        assert job["status"] == "succeeded", job
    assert _count(c, "jobs") == 11
    print(f"redis killed with jobs queued, restarted empty after 3 s: {len(ids)} of {len(ids)} jobs succeeded")


def test_postgres_stopped_20s_api_answers_503_records_nothing_and_jobs_finish(outage, servers, tiny):
    pg, _ = servers
    c, model, ids = _running_jobs(outage, tiny, 4)
    jobs_before, models_before = _count(c, "jobs"), _count(c, "models")
    stored_before = sorted(
        p for p in (outage.data_dir / "storage").rglob("*") if p.is_file() and "artifacts" not in p.parts
    )

    pg.stop()
    t_stop = time.monotonic()
    seen: dict[str, set[int]] = {"get": set(), "list": set(), "post_job": set(), "upload": set(), "readyz": set()}
    rounds = 0
    while time.monotonic() - t_stop < 20:
        rounds += 1
        seen["get"].add(c.get(f"/v1/jobs/{ids[0]}").status_code)
        seen["list"].add(c.get("/v1/jobs").status_code)
        r = c.post("/v1/jobs", json={"model_id": model, "steps": PRUNE, **CHEAP})
        seen["post_job"].add(r.status_code)
        if r.status_code == 503:
            assert r.json()["code"] == "database_unavailable" and r.headers["retry-after"], r.text
        seen["upload"].add(upload_dir(c, tiny["gpt2"]).status_code)
        seen["readyz"].add(httpx.get(f"{outage.service.url}/readyz").status_code)
        time.sleep(0.5)
    pg.start()
    assert all(codes == {503} for codes in seen.values()), seen
    print(f"postgres down 20 s: {rounds * len(seen)} requests ({rounds} rounds of {', '.join(seen)}), every one 503")

    deadline = time.monotonic() + 60
    while c.get("/v1/jobs").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    for job_id in ids:
        job = wait_job(c, job_id, timeout=240)
        assert job["status"] == "succeeded", job
    # Nothing the API answered 503 to was recorded: no job, no model, no stored file.
    assert jobs_left(outage, ids) == 0
    assert (_count(c, "jobs"), _count(c, "models")) == (jobs_before, models_before)
    stored_after = sorted(
        p for p in (outage.data_dir / "storage").rglob("*") if p.is_file() and "artifacts" not in p.parts
    )
    assert stored_after == stored_before


@pytest.fixture
def slow_requeue(servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second stack on the private servers (a database and a broker key prefix of its own) whose
    reconciler re-sends a queued job only after 10 minutes: a job message the worker dropped
    would wait that long. Its worker is started by the test."""
    pg, rd = servers
    tmp = tmp_path_factory.mktemp("slow-requeue")
    name = f"requeue_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = pg.url.rsplit("/", 1)[0] + f"/{name}"
    stack = _stack(tmp, url, rd.url, "requeue", worker=False, requeue_after_s=600, key_prefix=f"{name}:")
    yield stack
    stack.service.stop()


def test_worker_puts_back_jobs_it_took_while_postgres_was_down(slow_requeue, servers, tiny):
    pg, _ = servers
    c = slow_requeue.client()
    model = upload_dir(c, tiny["gpt2"]).json()["id"]
    ids = [_submit(c, model, CHEAP) for _ in range(3)]  # queued: no worker yet
    pg.stop()
    try:
        worker = slow_requeue.service.start_worker()
        log = slow_requeue.data_dir / "worker.log"
        # The worker starts and takes the first message; its claim cannot reach the database.
        deadline = time.monotonic() + 90
        while "OperationalError" not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        time.sleep(4)  # long enough for a worker that acknowledged it to take every message
    finally:
        pg.start()
    t_up = time.monotonic()
    for job_id in ids:
        # Well under the reconciler's 600 s: the messages came back to the queue.
        job = wait_job(c, job_id, timeout=120)
        assert job["status"] == "succeeded", job
    text = log.read_text(errors="replace")
    assert "back to the queue" in text
    print(f"postgres down while the worker took jobs: all {len(ids)} succeeded {time.monotonic() - t_up:.1f} s after")
