"""GET /v1/jobs/{id}/events: server-sent events of a real job on the real stacks, read to the end,
resumed with Last-Event-ID / ?last_event_id=, scoped to the tenant."""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import upload_dir, wait_job

STEPS = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]


def sse(client: httpx.Client, job_id: str, headers: dict | None = None, params: dict | None = None) -> Iterator[dict]:
    """The stream's events as {"id"?, "event", "data"} (comments skipped), parsed by hand."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store" and r.headers["x-accel-buffering"] == "no"
        event: dict = {}
        for line in r.iter_lines():
            if line == "":
                if event:
                    yield event
                event = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                assert name in ("id", "event", "data") and name not in event, line
                event[name] = json.loads(value) if name == "data" else value


def read_all(client: httpx.Client, job_id: str, **kw) -> list[dict]:
    return list(sse(client, job_id, **kw))


def submit(client: httpx.Client, model_id: str) -> dict:
    r = client.post("/v1/jobs", json={"model_id": model_id, "steps": STEPS, "evaluation": {"enabled": False}})
    assert r.status_code == 202, r.text
    return r.json()


def check_succeeded_run(events: list[dict], job: dict) -> list[dict]:
    """The stream of a job that ran to success: returns its events without ``end``."""
    *evs, end = events
    assert end == {"event": "end", "data": {"job_id": job["id"], "status": "succeeded"}}  # no id
    ids = [int(e["id"]) for e in evs]
    assert ids[0] > 0 and all(a < b for a, b in itertools.pairwise(ids)), ids
    assert all(e["event"] in ("status", "progress") and e["data"]["job_id"] == job["id"] for e in evs)
    first = evs[0]
    assert first["event"] == "status" and first["data"]["status"] == "queued" and first["data"]["attempt"] == 0
    assert first["data"]["progress"] == {"stage": "queued", "fraction": 0.0}
    running = [e for e in evs if e["event"] == "status" and e["data"]["status"] == "running"]
    assert running and running[0]["data"]["attempt"] == 1
    assert [e for e in evs if e["event"] == "progress"]
    fractions = [e["data"]["progress"]["fraction"] for e in evs]
    assert fractions == sorted(fractions), fractions
    last = evs[-1]
    assert last["event"] == "status" and last["data"]["status"] == "succeeded"
    assert last["data"]["progress"] == {"stage": "done", "fraction": 1.0}
    assert job["status"] == "succeeded" and last["data"]["artifact"] == job["artifact"]
    assert sum(1 for e in evs if e["data"]["status"] in ("succeeded", "failed", "canceled")) == 1
    return evs


@pytest.mark.integration
def test_stream_of_a_job_in_embedded(embedded, tiny):
    c = embedded.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = submit(c, m["id"])
    full = read_all(c, job["id"])  # from right after submit: replay, then live until the end
    done = wait_job(c, job["id"], timeout=5)  # the stream ended with the job
    evs = check_succeeded_run(full, done)

    # A finished job's stream replays the same history and ends at once.
    t0 = time.monotonic()
    assert read_all(c, job["id"]) == full
    assert time.monotonic() - t0 < 3

    # Resuming after an event in the middle gives exactly the events after it, by header or query.
    mid = len(evs) // 2
    assert read_all(c, job["id"], headers={"Last-Event-ID": evs[mid]["id"]}) == full[mid + 1 :]
    assert read_all(c, job["id"], params={"last_event_id": evs[mid]["id"]}) == full[mid + 1 :]
    # The header wins over the query (EventSource keeps the URL and sends the newest id).
    assert (
        read_all(c, job["id"], headers={"Last-Event-ID": evs[-2]["id"]}, params={"last_event_id": evs[0]["id"]})
        == full[-2:]
    )
    # After the terminal event: only `end`.
    assert read_all(c, job["id"], headers={"Last-Event-ID": evs[-1]["id"]}) == full[-1:]

    # Another tenant's job answers exactly like a missing one.
    other = embedded.client(embedded.other_key)
    theirs = other.get(f"/v1/jobs/{job['id']}/events")
    missing = other.get("/v1/jobs/00000000-0000-0000-0000-000000000000/events")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == {
        **missing.json(),
        "detail": missing.json()["detail"].replace("00000000-0000-0000-0000-000000000000", job["id"]),
    }
    assert embedded.client(None).get(f"/v1/jobs/{job['id']}/events").status_code == 401
    bad = c.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "abc"})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")


@pytest.mark.integration
def test_finished_job_without_history_gets_one_synthetic_event(embedded, tiny):
    """A job that finished before events were recorded: one status event with id 0, then end."""
    import sqlite3

    c = embedded.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = submit(c, m["id"])
    done = wait_job(c, job["id"])
    assert done["status"] == "succeeded"
    with sqlite3.connect(embedded.database_url.removeprefix("sqlite:///")) as conn:
        assert conn.execute("DELETE FROM job_events WHERE job_id = ?", (job["id"],)).rowcount > 0
    events = read_all(c, job["id"])
    assert [(e.get("id"), e["event"]) for e in events] == [("0", "status"), (None, "end")]
    data = events[0]["data"]
    assert data["status"] == "succeeded" and data["attempt"] == 1 and data["artifact"] == done["artifact"]
    assert data["progress"] == {"stage": "done", "fraction": 1.0} and data["at"].endswith("Z")
    assert read_all(c, job["id"], headers={"Last-Event-ID": "0"}) == events


@pytest.mark.integration
def test_stream_of_a_job_in_cluster(cluster, tiny):
    c = cluster.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = submit(c, m["id"])
    full = read_all(c, job["id"])
    evs = check_succeeded_run(full, wait_job(c, job["id"], timeout=5))
    mid = len(evs) // 2
    assert read_all(c, job["id"], headers={"Last-Event-ID": evs[mid]["id"]}) == full[mid + 1 :]


@pytest.mark.integration
def test_canceled_queued_job_streams_queued_then_canceled(cluster_no_worker, tiny):
    # A tenant of its own: the stack's tenant is shared with tests that count its canceled jobs.
    key = cluster_no_worker.service.cli("keys", "create", "--tenant", f"events-{uuid.uuid4().hex[:6]}")
    c = cluster_no_worker.client(key)
    m = upload_dir(c, tiny["gpt2"]).json()
    job = submit(c, m["id"])
    got: queue.Queue = queue.Queue()

    def listen() -> None:
        try:
            for e in sse(cluster_no_worker.client(key), job["id"]):
                got.put(e)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertions below
            got.put(e)
        got.put(None)

    threading.Thread(target=listen, daemon=True).start()
    queued = got.get(timeout=30)  # the stream is open and waiting on a queued job
    assert queued["event"] == "status" and queued["data"]["status"] == "queued", queued
    assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    canceled, end, closed = got.get(timeout=30), got.get(timeout=30), got.get(timeout=30)
    assert canceled["event"] == "status" and int(canceled["id"]) > int(queued["id"]), canceled
    assert canceled["data"]["status"] == "canceled" and canceled["data"]["cancel_requested"] is True
    assert canceled["data"]["progress"]["stage"] == "canceled"
    assert end == {"event": "end", "data": {"job_id": job["id"], "status": "canceled"}}
    assert closed is None
    assert read_all(c, job["id"]) == [queued, canceled, end]


@pytest.mark.unit
def test_repository_writes_one_event_per_visible_change(tmp_path):
    """The write rules on a bare SQLite database: lease renewals, repeated progress, a second
    cancel request and writes of a fenced-off attempt record nothing."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from core.db import make_engine  # the service's engine: SQLite with foreign keys on
    from core.jobs import repository as repo
    from core.tables import Base, Job, JobEvent, Tenant

    engine = make_engine(f"sqlite:///{tmp_path / 'events.sqlite3'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        job = Job(tenant_id=tenant.id, model_id=None, steps=[])
        s.add(job)
        s.flush()
        repo.record_submitted(s, job)
        s.commit()
        job_id = job.id

        def log() -> list[tuple]:
            rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [
                (
                    e.type,
                    e.data["status"],
                    e.data.get("attempt"),
                    e.data["progress"]["stage"],
                    e.data.get("cancel_requested"),
                )
                for e in rows
            ]

        assert repo.claim(s, job_id, 60) == 1
        assert repo.heartbeat(s, job_id, 1, 60)
        assert repo.progress(s, job_id, 1, "loading", 0.1, 60)
        assert repo.progress(s, job_id, 1, "loading", 0.1, 60)  # a lease renewal: no event
        assert not repo.progress(s, job_id, 2, "other", 0.2, 60)  # not this attempt's job
        assert repo.request_cancel(s, job_id)
        assert not repo.request_cancel(s, job_id)  # already requested
        s.commit()
        assert not repo.finish(s, job_id, 2, "failed", error_code="x", error_message="y")
        assert repo.finish(s, job_id, 1, "canceled", progress_stage="canceled")
        assert log() == [
            ("status", "queued", 0, "queued", False),
            ("status", "running", 1, "starting", False),
            ("progress", "running", 1, "loading", None),
            ("status", "running", 1, "loading", True),
            ("status", "canceled", 1, "canceled", True),
        ]
        ids = s.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        assert ids == sorted(set(ids)) and ids[0] >= 1
        s.delete(s.get(Job, job_id))  # events go with their job
        s.commit()
        assert s.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id)) is None
    engine.dispose()
