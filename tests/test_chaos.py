"""Worker kills, for real: SIGKILL of the Celery worker's main process or of its pool child while
jobs run, on a stack of its own (short leases so that recovery takes seconds, not minutes).

* Chaos: 51 jobs of three specs (more, in waves of 9, if they all finish before the 3rd kill); every 10-20 s (seeded) the worker is SIGKILLed, alternately the
  main process (then a new worker is started, as a supervisor would) and the pool child (Celery's
  main process forks a new one). Afterwards every job has exactly one terminal status, succeeded;
  no job has a second artifact or a temporary file in storage; the attempts of a job never overlap
  (every event an attempt wrote comes before the first event of the next attempt); and every
  artifact's sha256 equals the one a clean run of its spec produced before the kills began.
* Poison: a job whose pool process is SIGKILLed every time it runs it (as an OOM killer would) is
  failed with ``too_many_attempts`` after MODELPRESS_MAX_ATTEMPTS (3) attempts; the worker lives on.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, _cluster_env
from tests.helpers import Service, jobs_left, query, upload_dir, wait_job
from tests.servers import private_database

MAX_ATTEMPTS = 3
MIN_KILLS = 3  # the main process twice, the pool child once (they alternate)
CHEAP = {"evaluation": {"enabled": False}}
SPECS = {
    "prune50": ("gpt2-big", [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]),
    "fp16": ("gpt2-big", [{"method": "quantize.cast", "params": {"dtype": "float16"}}]),
    "llama-prune": ("llama", [{"method": "prune.magnitude", "params": {"sparsity": 0.4}},
                              {"method": "quantize.cast", "params": {"dtype": "bfloat16"}}]),
}


def _kill_stack(pg_database: str, tmp: Path, max_attempts: int) -> Stack:
    env = {
        **_cluster_env(pg_database, tmp, f"mptest-chaos-{uuid.uuid4().hex[:8]}:"),
        # A dead attempt's lease runs out in 4 s (renewed every 1.3 s while alive), the reconciler
        # looks every second and re-sends what was last sent 2 s ago.
        "MODELPRESS_JOB_LEASE_S": "4", "MODELPRESS_REQUEUE_AFTER_S": "2", "MODELPRESS_RECONCILE_INTERVAL_S": "1",
        "MODELPRESS_MAX_ATTEMPTS": str(max_attempts),
    }
    svc = Service(env, tmp, worker=True)
    svc.cli("migrate")
    key = svc.cli("keys", "create", "--tenant", f"chaos-{uuid.uuid4().hex[:6]}")
    svc.start()
    return Stack("cluster", svc, key, key, tmp, pg_database)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Chaos is not poison: a job the killer happened to hit a few times must not be given up on.
    with private_database() as db:
        st = _kill_stack(db, tmp_path_factory.mktemp("chaos"), max_attempts=10)
        yield st
        st.service.stop()


@pytest.fixture(scope="module")
def poison_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with private_database() as db:
        st = _kill_stack(db, tmp_path_factory.mktemp("poison"), max_attempts=MAX_ATTEMPTS)
        yield st
        st.service.stop()


def _worker(stack: Stack):  # noqa: ANN202 - the live worker's Popen
    return [p for p in stack.service.procs if p is not stack.service.api][-1]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _running(stack: Stack, job_ids: list[str]) -> list[tuple[str, int]]:
    return query(stack, "SELECT id, attempt FROM jobs WHERE id = ANY(%s) AND status = 'running'", job_ids)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_ready_worker(stack: Stack, timeout: float = 60) -> None:
    """Until the worker's main process has forked its pool child (it is consuming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _children(_worker(stack).pid):
            return
        time.sleep(0.2)
    raise AssertionError("the worker did not start its pool")


def test_sigkill_chaos_loses_nothing_duplicates_nothing(chaos, tiny):
    c = chaos.client()
    models = {name: upload_dir(c, tiny[name]).json()["id"] for name in {m for m, _ in SPECS.values()}}

    def submit(spec: str) -> str:
        model, steps = SPECS[spec]
        r = c.post("/v1/jobs", json={"model_id": models[model], "steps": steps, "name": spec, **CHEAP})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    # Clean runs first: the sha256 each spec's artifact must have.
    clean = {}
    for spec in SPECS:
        job = wait_job(c, submit(spec), timeout=120)
        assert job["status"] == "succeeded", job
        clean[spec] = job["artifact"]["sha256"]

    specs = [s for _ in range(17) for s in SPECS]  # 51 jobs
    jobs = {submit(spec): spec for spec in specs}
    ids = list(jobs)
    rng = random.Random(6)
    kills: list[dict] = []
    done = threading.Event()

    def killer() -> None:
        n = 0
        while not done.wait(rng.uniform(10, 20)):
            _wait_ready_worker(chaos)
            # Kill while a job runs and others wait: the last few jobs of a wave are left alone, so
            # that the kills spread over the jobs instead of hitting one straggler again and again.
            while not done.is_set() and not (_running(chaos, ids) and jobs_left(chaos, ids) >= 3):
                time.sleep(0.05)
            if done.is_set():
                return
            main = _worker(chaos)
            children = _children(main.pid)
            if n % 2 and not children:  # between a child's death and its replacement: next round
                continue
            victim = main.pid if n % 2 == 0 else children[0]
            hit = _running(chaos, ids)
            os.kill(victim, signal.SIGKILL)
            kills.append({"t": time.monotonic(), "target": "main" if victim == main.pid else "child", "running": hit})
            if victim == main.pid:
                main.wait()
                chaos.service.start_worker()  # what systemd / Kubernetes would do
            n += 1

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline:
            left = jobs_left(chaos, ids)
            if left == 0 and len(kills) >= MIN_KILLS:
                break
            if left == 0:
                # A fast machine finished before the kills the test wants: another wave of jobs.
                for spec in [s for _ in range(3) for s in SPECS]:
                    job_id = submit(spec)
                    jobs[job_id] = spec
                    ids.append(job_id)
            time.sleep(0.5)
    finally:
        done.set()
        t.join(timeout=90)
    assert left == 0, f"{left} jobs did not finish; kills: {kills}"
    assert len(kills) >= MIN_KILLS and {k["target"] for k in kills} == {"main", "child"}, kills

    rows = {r[0]: r[1:] for r in query(chaos, "SELECT id, status, attempt, artifact_key, artifact_sha256 FROM jobs WHERE id = ANY(%s)", ids)}
    assert len(rows) == len(jobs) >= 51
    hit = {job_id for k in kills for job_id, _ in k["running"]}
    assert any(rows[j][1] > 1 for j in hit), f"no killed job was run again: {kills}"
    events: dict[str, list[tuple]] = defaultdict(list)
    for job_id, etype, data, at in query(chaos, "SELECT job_id, type, data, created_at FROM job_events WHERE job_id = ANY(%s) ORDER BY id", ids):
        events[job_id].append((etype, data, at))
    storage = chaos.data_dir / "storage"
    assert not [p for p in storage.rglob("*.tmp-*")], "a half-written file was left in storage"
    for job_id, spec in jobs.items():
        status, attempt, key, sha = rows[job_id]
        assert status == "succeeded", (job_id, rows[job_id], kills)
        terminal = [d for e, d, _ in events[job_id] if e == "status" and d["status"] in ("succeeded", "failed", "canceled")]
        assert [d["status"] for d in terminal] == ["succeeded"], (job_id, terminal)
        # One artifact, the one the row names, byte for byte what a clean run made.
        files = [p for p in (storage / "artifacts" / job_id).rglob("*") if p.is_file()]
        assert [p.relative_to(storage).as_posix() for p in files] == [key], (job_id, files)
        assert sha == clean[spec] == _sha(files[0]), (job_id, spec)
        # Attempts never overlap: each attempt's writes all precede the next attempt's first.
        spans: dict[int, list] = {}
        for _, d, at in events[job_id]:
            if d.get("attempt"):
                spans.setdefault(d["attempt"], [at, at])[1] = at
        order = sorted(spans)
        assert order[-1] == attempt
        for a, b in zip(order, order[1:]):
            assert spans[a][1] <= spans[b][0], (job_id, spans)
    retried = sum(1 for r in rows.values() if r[1] > 1)
    print(f"chaos: {len(jobs)} jobs, {len(kills)} kills ({sum(k['target'] == 'main' for k in kills)} main), {retried} jobs ran more than once")


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(poison_stack, tiny):
    chaos = poison_stack
    c = chaos.client()
    model = upload_dir(c, tiny["gpt2-big"]).json()["id"]
    # Slow enough to be caught running: a report with many timed passes.
    poison = c.post("/v1/jobs", json={"model_id": model, "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
                                      "evaluation": {"runs": 100, "warmup": 20, "seq_len": 64, "batch_size": 8}}).json()["id"]
    _wait_ready_worker(chaos)
    main = _worker(chaos)
    killed: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        (status, attempt), = query(chaos, "SELECT status, attempt FROM jobs WHERE id = %s", poison)
        if status in ("succeeded", "failed", "canceled"):
            break
        if status == "running" and attempt not in killed:
            for child in _children(main.pid):
                os.kill(child, signal.SIGKILL)  # the OOM killer's verdict, every time it runs
            killed.append(attempt)
        time.sleep(0.05)
    job = c.get(f"/v1/jobs/{poison}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "too_many_attempts", job
    assert killed == list(range(1, MAX_ATTEMPTS + 1)) and job["attempt"] == MAX_ATTEMPTS, (killed, job)
    # The worker's main process survived every kill of its child and serves the next job.
    assert main.poll() is None
    ok = c.post("/v1/jobs", json={"model_id": model, "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}], **CHEAP}).json()
    assert wait_job(c, ok["id"], timeout=60)["status"] == "succeeded"
