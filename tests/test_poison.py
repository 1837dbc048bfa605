"""Poison jobs: a job whose worker dies on every attempt is failed with ``too_many_attempts`` after
``MODELPRESS_MAX_ATTEMPTS`` (3 on the test stacks) instead of being re-sent forever.

A dead worker is simulated the way tests/test_reconcile.py does it: by writing the row a SIGKILLed
worker leaves behind (status running, lease expired, attempt = N). No test makes a job really kill
its worker process: that would need a test-only method installed in the worker.
"""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.helpers import upload_dir, wait_job
from tests.test_events import read_all
from tests.test_reconcile import _insert_job

MAX = 3  # the default of MODELPRESS_MAX_ATTEMPTS; the stacks do not set it


def _events(stack, job_id: str) -> list[tuple[str, dict]]:
    url = stack.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT type, data FROM job_events WHERE job_id = %s ORDER BY id", (job_id,)).fetchall()
    return [(t, d) for t, d in rows]


@pytest.mark.unit
def test_default_max_attempts_is_three():
    from core.config import Settings

    assert Settings().max_attempts == MAX


@pytest.mark.integration
def test_reconciler_fails_a_job_whose_worker_died_max_times_and_retries_one_below(cluster, tiny):
    c = cluster.client()
    model = upload_dir(c, tiny["gpt2"]).json()
    # Killed workers: the last allowed attempt died (lease expired 60 s ago) ...
    poison = _insert_job(cluster, model, "running", MAX, sent_ago_s=3600, lease_ago_s=60)
    # ... also when its message was sent a moment ago (the lease, not the send time, says it is dead).
    poison_fresh = _insert_job(cluster, model, "running", MAX, sent_ago_s=1, lease_ago_s=60)
    # One attempt left: re-sent and run as attempt MAX.
    retry = _insert_job(cluster, model, "running", MAX - 1, sent_ago_s=3600, lease_ago_s=60)
    # At the limit but the lease is live (the last attempt is still running): untouched.
    live = _insert_job(cluster, model, "running", MAX, sent_ago_s=3600, lease_ago_s=-600)

    resent = set(cluster.service.cli("reconcile", "--once").split())
    assert poison not in resent and poison_fresh not in resent, "a poison job's message is not re-sent"
    assert live not in resent

    for job_id in (poison, poison_fresh):
        job = wait_job(c, job_id, timeout=30)
        assert job["status"] == "failed" and job["attempt"] == MAX, job
        assert job["error"]["code"] == "too_many_attempts", job
        assert f"died {MAX} times" in job["error"]["message"] and f"attempts 1-{MAX}" in job["error"]["message"], job
        # One status event, written with the change: failed (the hand-written row had none before).
        events = _events(cluster, job_id)
        assert [(t, d["status"]) for t, d in events] == [("status", "failed")], events
        assert events[0][1]["error"]["code"] == "too_many_attempts"
        # And the events stream shows it, then ends.
        streamed = read_all(c, job_id)
        assert [e["event"] for e in streamed] == ["status", "end"], streamed
        assert streamed[0]["data"]["status"] == "failed" and streamed[0]["data"]["error"]["code"] == "too_many_attempts"

    job = wait_job(c, retry)
    assert job["status"] == "succeeded" and job["attempt"] == MAX, job
    statuses = [(t, d["status"], d["attempt"]) for t, d in _events(cluster, retry) if t == "status"]
    assert statuses == [("status", "running", MAX), ("status", "succeeded", MAX)], statuses

    assert c.get(f"/v1/jobs/{live}").json()["status"] == "running"
    # A second pass changes nothing for them.
    cluster.service.cli("reconcile", "--once")
    assert [d["status"] for _, d in _events(cluster, poison)] == ["failed"]


@pytest.mark.integration
def test_give_up_is_one_compare_and_set(cluster, tiny):
    """Many workers receiving the (duplicated) message of a poison job at once: one fails it, one
    failed event is written. On the cluster's PostgreSQL (the stack's reconciler may be a racer too)."""
    from core.db import make_engine
    from core.jobs import repository as repo

    c = cluster.client()
    model = upload_dir(c, tiny["gpt2"]).json()
    job_id = _insert_job(cluster, model, "running", MAX, sent_ago_s=1, lease_ago_s=60)
    engine = make_engine(cluster.database_url)
    results: list[bool] = []
    claims: list[int | None] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        with Session(engine) as s:
            barrier.wait()
            claims.append(repo.claim(s, job_id, 60, MAX))
            results.append(repo.give_up(s, job_id, MAX))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert claims == [None] * 6, "nobody runs attempt MAX + 1"
    assert results.count(True) <= 1  # 0 when the stack's own reconciler got there first
    job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "too_many_attempts" and job["attempt"] == MAX
    assert [d["status"] for _, d in _events(cluster, job_id)] == ["failed"]


@pytest.mark.unit
def test_worker_claim_fails_a_poison_job_instead_of_running_it(tmp_path, monkeypatch):
    """run_job itself (the path of a re-sent or redelivered message), in this process on a private
    SQLite database: at attempt MAX it fails the job; below MAX, claim takes it as attempt N + 1."""
    from core import config, db
    from core.jobs import repository as repo
    from core.tables import Base, Job, JobEvent, Tenant, utcnow

    for k in list(__import__("os").environ):
        if k.startswith("MODELPRESS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODELPRESS_MAX_ATTEMPTS", str(MAX))
    caches = (config.get_settings, db.get_engine, db.get_sessionmaker)
    for fn in caches:
        fn.cache_clear()
    try:
        from worker.pipeline import run_job

        engine = db.get_engine()
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            tenant = Tenant(name=f"t-{uuid.uuid4().hex[:6]}")
            s.add(tenant)
            s.flush()
            expired = utcnow() - timedelta(seconds=60)
            dead = Job(
                tenant_id=tenant.id, model_id=None, steps=[], status="running", attempt=MAX, lease_expires_at=expired
            )
            below = Job(
                tenant_id=tenant.id,
                model_id=None,
                steps=[],
                status="running",
                attempt=MAX - 1,
                lease_expires_at=expired,
            )
            s.add_all([dead, below])
            s.commit()
            dead_id, below_id = dead.id, below.id

        run_job(dead_id)  # the message of a job whose worker died MAX times
        run_job(dead_id)  # a duplicate: nothing more happens
        with Session(engine) as s:
            job = s.get(Job, dead_id)
            assert (job.status, job.attempt, job.error_code) == ("failed", MAX, "too_many_attempts")
            assert (
                job.error_message
                == f"the job's worker died {MAX} times while running it (attempts 1-{MAX}); it is not retried again"
            )
            assert job.finished_at is not None and job.lease_expires_at is None
            events = s.scalars(select(JobEvent).where(JobEvent.job_id == dead_id)).all()
            assert [(e.type, e.data["status"], e.data["error"]["code"]) for e in events] == [
                ("status", "failed", "too_many_attempts")
            ]

            # One attempt left: claimed as attempt MAX (run_job would then run it).
            assert repo.claim(s, below_id, 60, MAX) == MAX
            assert not repo.give_up(s, below_id, MAX), "a live lease is not given up"
        engine.dispose()
    finally:
        for fn in caches:
            fn.cache_clear()


@pytest.mark.unit
def test_message_for_one_attempt():
    from core.jobs.repository import attempts_died_message

    assert (
        attempts_died_message(1) == "the job's worker died once while running it (attempt 1); it is not retried again"
    )
