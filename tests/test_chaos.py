"""Worker kills, for real, at the DEFAULT lease and heartbeat settings (30 s lease renewed every
5 s by the job process's keeper, reconciler every 10 s, at most 3 attempts).

* Chaos: 50 jobs on 3 workers, each with a data folder of its own (its scratch, as on a host of
  its own). 12 SIGKILLs, each of a worker running a job it claimed first (attempt 1), in turn of
  the worker's main process (the pool child dies with its parent), its pool child (Celery's main
  process forks a new one) and its whole process group (the job's lease keeper too: only the
  lease's expiry tells), a new worker started on the same "host" after the first and the last, as
  a supervisor would. Afterwards: every job succeeded with exactly one terminal status event; exactly the 12
  killed jobs ran a second attempt and no other job did (no live job lost its lease); each job has
  one artifact in storage, sha256 equal to a clean run of its spec; the attempts of a job never
  overlap; and every killed job's next attempt was claimed within 60 s of the kill (the attempt's
  first status event).

Poison jobs and the lease's keeper on its own: tests/test_heartbeat.py.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.chaos_util import Worker, attempt_started_at, kill_stack
from tests.conftest import Stack
from tests.helpers import jobs_left, query, upload_dir, wait_job
from tests.servers import private_database

# xdist (make test, --dist loadgroup): the modules that kill processes or servers and bound the
# recovery time share one group, so they run one after another on one worker, never two at once
# (tests/conftest.py, _schedule_for_xdist).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("kills")]

WORKERS = 3
JOBS = 50
KILLS = 12
RECOVERY_S = 60
# What is SIGKILLed, in turn: the worker's main process (its pool child dies with it; the job's
# lease keeper sees that and ends the lease), the pool child alone (the main process forks a new
# one), or the worker's whole process group, lease keeper included (a lost host, `docker kill`:
# nobody says the job died, its lease runs out).
KINDS = ("main", "child", "group")
# A short report keeps each job a few seconds long, so that kills land mid-job; it does not change
# the artifact (whose bytes the test compares). A budget of 1 s (2 s before: the test's 50 jobs are
# the largest CPU cost of the suite, which CI runs on 2 cores) still leaves each job a few seconds.
EVAL = {"evaluation": {"runs": 2, "warmup": 1, "max_samples": 8, "seq_len": 32, "budget_s": 1.0}}
SPECS = {
    "prune50": ("gpt2-big", [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]),
    "fp16": ("gpt2-big", [{"method": "quantize.cast", "params": {"dtype": "float16"}}]),
    "llama-prune": (
        "llama",
        [
            {"method": "prune.magnitude", "params": {"sparsity": 0.4}},
            {"method": "quantize.cast", "params": {"dtype": "bfloat16"}},
        ],
    ),
}


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[Worker]]]:
    with private_database() as db:
        st = kill_stack(db, tmp_path_factory.mktemp("chaos"), worker=False)
        workers = [Worker(st, f"w{i}").start() for i in range(WORKERS)]
        yield st, workers
        st.service.stop()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _victims(stack: Stack, workers: list[Worker]) -> list[tuple[Worker, str]]:
    """(worker, job) for each worker whose pool child runs a job on its first attempt: the job
    folder in the worker's scratch named after that very process (core/procid.py's token)."""
    out = []
    for w in workers:
        child = w.pool_child()
        if child is None or w.proc.poll() is not None:
            continue
        mine = [p.name for p in w.tmp.glob("job-*") if p.name.split(".", 1)[-1].split("-")[1:2] == [str(child)]]
        for name in mine:
            job_id, _, attempt = name[len("job-") :].split(".", 1)[0].rpartition("-")
            if attempt == "1":
                out.append((w, job_id))
    if not out:
        return []
    running = {
        r[0]
        for r in query(
            stack, "SELECT id FROM jobs WHERE id = ANY(%s) AND status = 'running' AND attempt = 1", [j for _, j in out]
        )
    }
    return [(w, j) for w, j in out if j in running]


def test_sigkill_chaos_at_default_settings_loses_nothing_and_recovers_within_60s(chaos, tiny):
    stack, workers = chaos
    t_start = time.monotonic()
    c = stack.client()
    models = {name: upload_dir(c, tiny[name]).json()["id"] for name in {m for m, _ in SPECS.values()}}

    def submit(spec: str) -> str:
        model, steps = SPECS[spec]
        r = c.post("/v1/jobs", json={"model_id": models[model], "steps": steps, "name": spec, **EVAL})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    for w in workers:
        w.wait_ready()
    # Clean runs first: the sha256 each spec's artifact must have.
    clean = {}
    for spec in SPECS:
        job = wait_job(c, submit(spec), timeout=120)
        assert job["status"] == "succeeded", job
        clean[spec] = job["artifact"]["sha256"]

    specs = [list(SPECS)[i % len(SPECS)] for i in range(JOBS)]
    jobs = {submit(spec): spec for spec in specs}
    ids = list(jobs)
    rng = random.Random(15)
    kills: list[dict] = []
    done = threading.Event()
    failure: list[BaseException] = []

    def killer() -> None:
        try:
            while len(kills) < KILLS and not done.wait(rng.uniform(2, 5)):
                hit = {k["job"] for k in kills}
                victims = [(w, j) for w, j in _victims(stack, workers) if j not in hit]
                if not victims:
                    continue
                w, job_id = rng.choice(victims)
                target = KINDS[len(kills) % len(KINDS)]
                child = w.pool_child()
                if child is None:
                    continue
                if target == "group":
                    os.killpg(w.proc.pid, signal.SIGKILL)  # main, pool child and the lease keeper at once
                else:
                    os.kill(w.proc.pid if target == "main" else child, signal.SIGKILL)
                kills.append({"at": datetime.now(UTC), "job": job_id, "worker": w.name, "target": target})
                if target != "child":
                    w.proc.wait()
                    w.start()  # what systemd / Kubernetes would do, on the same host
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failure.append(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    # How long the 50 jobs may take in all: a test timeout, not a claim of the service (the
    # claims are the assertions below: nothing lost, each kill recovered within RECOVERY_S).
    # Alone on the 2-core machine the whole test takes ~210 s; under `make test` the other xdist
    # worker's tests share the cores and 300 s left 8 of the jobs still running (twice, in CI).
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not failure:
        left = jobs_left(stack, ids)
        if len(kills) >= KILLS and left == 0:
            break
        if left == 0:
            # A fast machine finished before the kills the test wants: another wave of jobs.
            for spec in SPECS:
                job_id = submit(spec)
                jobs[job_id] = spec
                ids.append(job_id)
        time.sleep(0.5)
    done.set()
    t.join(timeout=120)
    assert not failure, failure
    assert left == 0, f"{left} jobs did not finish; kills: {kills}"
    assert len(kills) == KILLS and {k["target"] for k in kills} == set(KINDS), kills

    rows = {
        r[0]: r[1:]
        for r in query(
            stack, "SELECT id, status, attempt, artifact_key, artifact_sha256 FROM jobs WHERE id = ANY(%s)", ids
        )
    }
    assert len(rows) == len(jobs) >= JOBS
    killed = [k["job"] for k in kills]
    assert len(set(killed)) == KILLS, "a job was killed twice"
    # Exactly the killed jobs ran again, once: no live job lost its lease to a reclaim.
    assert {j for j, r in rows.items() if r[1] > 1} == set(killed), (
        {j: r[1] for j, r in rows.items() if r[1] > 1},
        killed,
    )
    assert all(rows[j][1] == 2 for j in killed)
    # Each kill recovered: the killed job's next attempt was claimed within RECOVERY_S.
    for k in kills:
        started = attempt_started_at(stack, k["job"], 2)
        k["recovered_s"] = (started - k["at"]).total_seconds()
    for k in kills:
        print(
            f"kill of {k['target']} of worker {k['worker']} at {k['at']:%H:%M:%S} running job {k['job']}: "
            f"recovered in {k['recovered_s']:.1f} s"
        )
    slow = [k for k in kills if not 0 < k["recovered_s"] <= RECOVERY_S]
    assert not slow, slow

    events: dict[str, list[tuple]] = defaultdict(list)
    for job_id, etype, data, at in query(
        stack, "SELECT job_id, type, data, created_at FROM job_events WHERE job_id = ANY(%s) ORDER BY id", ids
    ):
        events[job_id].append((etype, data, at))
    storage = stack.data_dir / "storage"
    assert not [p for p in storage.rglob("*.tmp-*")], "a half-written file was left in storage"
    for job_id, spec in jobs.items():
        status, attempt, key, sha = rows[job_id]
        assert status == "succeeded", (job_id, rows[job_id], kills)
        terminal = [
            d for e, d, _ in events[job_id] if e == "status" and d["status"] in ("succeeded", "failed", "canceled")
        ]
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
        for a, b in itertools.pairwise(order):
            assert spans[a][1] <= spans[b][0], (job_id, spans)
    rec = sorted(k["recovered_s"] for k in kills)
    by_kind = {kind: sorted(k["recovered_s"] for k in kills if k["target"] == kind) for kind in KINDS}
    print(
        f"\nchaos: {len(jobs)} jobs on {WORKERS} workers, {len(kills)} kills, 0 lost, 0 differing artifacts; "
        f"recovery (kill -> next attempt claimed) max {rec[-1]:.1f} s, median {statistics.median(rec):.1f} s; "
        + "; ".join(f"{kind} x{len(v)}: {', '.join(f'{x:.1f}' for x in v)} s" for kind, v in by_kind.items())
        + f"; test {time.monotonic() - t_start:.0f} s"
    )
