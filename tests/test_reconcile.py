"""Lost messages do not strand jobs: the reconciler re-sends the message of a job that is queued
(or running with an expired lease) and was last sent long ago, and a real worker then finishes it.
The lost messages are simulated by writing job rows that no message was ever sent for."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.helpers import upload_dir, wait_job

pytestmark = pytest.mark.integration

STEPS = [{"method": "quantize.cast", "params": {"dtype": "float16"}}]


def _insert_job(stack, model: dict, status: str, attempt: int, sent_ago_s: float, lease_ago_s: float | None) -> str:
    now = datetime.now(UTC)
    job_id = str(uuid.uuid4())
    url = stack.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        tenant = conn.execute("SELECT tenant_id FROM models WHERE id = %s", (model["id"],)).fetchone()[0]
        conn.execute(
            "INSERT INTO jobs (id, tenant_id, model_id, steps, queue, status, attempt, cancel_requested,"
            " progress_stage, progress_fraction, created_at, enqueued_at, started_at, lease_expires_at)"
            " VALUES (%s, %s, %s, %s, 'cpu', %s, %s, false, %s, 0, %s, %s, %s, %s)",
            (
                job_id,
                tenant,
                model["id"],
                json.dumps(STEPS),
                status,
                attempt,
                status,
                now - timedelta(seconds=sent_ago_s),
                now - timedelta(seconds=sent_ago_s),
                now - timedelta(seconds=sent_ago_s) if status == "running" else None,
                now - timedelta(seconds=lease_ago_s) if lease_ago_s is not None else None,
            ),
        )
    return job_id


def _sent_within(stack, job_id: str, seconds: float) -> bool:
    url = stack.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        (sent,) = conn.execute("SELECT enqueued_at FROM jobs WHERE id = %s", (job_id,)).fetchone()
    return sent is not None and sent > datetime.now(UTC) - timedelta(seconds=seconds)


def test_reconciler_recovers_lost_messages(cluster, tiny):
    c = cluster.client()
    model = upload_dir(c, tiny["gpt2"]).json()
    lost_queued = _insert_job(cluster, model, "queued", 0, sent_ago_s=3600, lease_ago_s=None)
    dead_worker = _insert_job(cluster, model, "running", 1, sent_ago_s=3600, lease_ago_s=60)
    fresh = _insert_job(cluster, model, "queued", 0, sent_ago_s=1, lease_ago_s=None)
    live = _insert_job(cluster, model, "running", 1, sent_ago_s=3600, lease_ago_s=-600)  # lease still valid

    resent = set(cluster.service.cli("reconcile", "--once").split())
    # The cluster's worker runs the same reconciler every 30 s; when its pass falls between the
    # inserts and this call, it re-sent them first. Either way each was re-sent just now, once.
    for job_id in (lost_queued, dead_worker):
        assert job_id in resent or _sent_within(cluster, job_id, 120), job_id
    assert fresh not in resent and live not in resent
    # A second pass right away does not send them again.
    assert not ({lost_queued, dead_worker} & set(cluster.service.cli("reconcile", "--once").split()))

    done = wait_job(c, lost_queued)
    assert done["status"] == "succeeded" and done["attempt"] == 1
    done = wait_job(c, dead_worker)
    assert done["status"] == "succeeded" and done["attempt"] == 2, "the new attempt fences the dead one"
    assert c.get(f"/v1/jobs/{live}").json()["status"] == "running"
    assert c.get(f"/v1/jobs/{fresh}").json()["status"] == "queued"


def test_an_expired_lease_is_resent_at_once_and_once(cluster, tiny):
    """A running job whose lease expired (its worker died) is re-sent without waiting for
    MODELPRESS_REQUEUE_AFTER_S (300 s on this stack): its message went with its worker. Once
    re-sent after the expiry, it is not sent again before MODELPRESS_RECLAIM_RESEND_S (30 s):
    then it is, since that message can be lost too (a worker killed before it claimed the job),
    and no worker has claimed the job since."""
    c = cluster.client()
    model = upload_dir(c, tiny["gpt2"]).json()
    just_died = _insert_job(cluster, model, "running", 1, sent_ago_s=20, lease_ago_s=2)
    resent_since = _insert_job(cluster, model, "running", 1, sent_ago_s=5, lease_ago_s=60)
    resent_unclaimed = _insert_job(cluster, model, "running", 1, sent_ago_s=45, lease_ago_s=60)

    resent = set(cluster.service.cli("reconcile", "--once").split())
    assert just_died in resent or _sent_within(cluster, just_died, 60)
    assert resent_since not in resent and not _sent_within(cluster, resent_since, 4)
    assert resent_unclaimed in resent or _sent_within(cluster, resent_unclaimed, 30)
    for job_id in (just_died, resent_unclaimed):
        done = wait_job(c, job_id)
        assert done["status"] == "succeeded" and done["attempt"] == 2
