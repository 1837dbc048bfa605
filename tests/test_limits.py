"""Per-job limits and per-tenant quotas, on stacks of their own (the limits are process settings).

Limits: a real worker with a 3 s time limit and a 128 MiB memory limit. A job over either fails
with its own error code (``time_limit``, ``memory_limit``), the worker process is the same one
afterwards and its next job succeeds.

Quotas: an API without a worker (jobs stay queued, so "in flight" is under the test's control),
2 jobs in flight and a few MB stored per tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, _cluster_env
from tests.helpers import Service, stored_files, table_rows, upload_dir, wait_job
from tests.servers import private_database
from tests.tokenizer_util import build_models, txt_dataset

# xdist (make test, --dist loadgroup): the modules that kill processes or servers and bound the
# recovery time share one group, so they run one after another on one worker, never two at once
# (tests/conftest.py, _schedule_for_xdist).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("kills")]

TIME_LIMIT_S = 3
MEMORY_LIMIT_MB = 128
CHEAP = {"evaluation": {"enabled": False}}


def _stack(pg_database: str, tmp: Path, worker: bool, **env: str) -> Stack:
    svc = Service({**_cluster_env(pg_database, tmp, f"mptest-{uuid.uuid4().hex[:8]}:"), **env}, tmp, worker=worker)
    svc.cli("migrate")
    key = svc.cli("keys", "create", "--tenant", f"lim-{uuid.uuid4().hex[:6]}")
    other = svc.cli("keys", "create", "--tenant", f"lim-{uuid.uuid4().hex[:6]}")
    svc.start()
    return Stack("cluster", svc, key, other, tmp, pg_database)


@pytest.fixture(scope="module")
def private_db() -> Iterator[str]:
    with private_database() as db:
        yield db


@pytest.fixture(scope="module")
def limited(private_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = _stack(
        private_db,
        tmp_path_factory.mktemp("limited"),
        True,
        MODELPRESS_JOB_TIME_LIMIT_S=str(TIME_LIMIT_S),
        MODELPRESS_JOB_MEMORY_LIMIT_MB=str(MEMORY_LIMIT_MB),
        MODELPRESS_MAX_UPLOAD_BYTES=str(256 * 2**20),
        # An explicit budget: the hog's plan is over the memory limit, and without this the
        # worker's budget (capped by that limit) would refuse it at submit; this test is
        # about the watchdog that stops a job whose plan was wrong (tests/test_plan.py
        # covers the refusal).
        MODELPRESS_WORKER_MEMORY_BUDGET_MB="65536",
        # The in-memory path: the streaming engine would prune the hog tensor by tensor,
        # far under the limit, and this test needs a job that outgrows it.
        MODELPRESS_STREAM_ENGINE="false",
    )
    yield st
    st.service.stop()


@pytest.fixture(scope="module")
def hog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 of ~113 MB of fp32 weights: loading, measuring, pruning and reloading it takes
    several times the memory limit."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hog") / "gpt2-hog"
    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=768, n_head=8, vocab_size=500, n_positions=64)).save_pretrained(path)
    return path


def _worker_pid(stack: Stack) -> int:
    workers = [p for p in stack.service.procs if p is not stack.service.api]
    assert len(workers) == 1 and workers[0].poll() is None, "the worker process is alive"
    return workers[0].pid


def test_time_and_memory_limits_fail_the_job_with_their_own_code_and_the_worker_survives(limited, tiny, hog):
    c = limited.client()
    pid = _worker_pid(limited)
    small = upload_dir(c, tiny["gpt2"]).json()
    huge = upload_dir(c, hog).json()
    prune = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]

    # Slow, not big: a distillation of a tiny GPT-2 with ten million optimizer steps.
    tok = build_models(limited.data_dir / "tokmodels")["gpt2"]
    tm = upload_dir(c, tok).json()
    ds = c.post("/v1/datasets", files={"file": ("corpus.txt", txt_dataset())}).json()
    slow = c.post(
        "/v1/jobs",
        json={
            "model_id": tm["id"],
            "dataset_id": ds["id"],
            **CHEAP,
            "steps": [{"method": "distill", "params": {"layers": 1, "steps": 10_000_000}}],
        },
    ).json()
    job = wait_job(c, slow["id"], timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit", job
    assert f"time limit of {TIME_LIMIT_S} s" in job["error"]["message"]
    assert job["attempt"] == 1, "a job over a limit is failed, not run again"

    # Big, not slow (the stack builds models in memory: see the fixture). No evaluation: its
    # budget (seconds) would outlast the time limit before the pruning grows the memory.
    hungry = c.post("/v1/jobs", json={"model_id": huge["id"], "steps": prune, **CHEAP}).json()
    job = wait_job(c, hungry["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "memory_limit", job
    assert f"memory limit of {MEMORY_LIMIT_MB} MiB" in job["error"]["message"]
    assert job["attempt"] == 1, "a job over a limit is failed, not run again"

    # The same worker process goes on: its next job succeeds within both limits.
    ok = c.post("/v1/jobs", json={"model_id": small["id"], "steps": prune, **CHEAP}).json()
    assert wait_job(c, ok["id"], timeout=60)["status"] == "succeeded"
    assert _worker_pid(limited) == pid
    # Nothing of the failed jobs is stored.
    arts = [p for p in stored_files(limited) if "artifacts" in p.parts]
    assert {p.parts[p.parts.index("artifacts") + 1] for p in arts} == {ok["id"]}


@pytest.fixture(scope="module")
def quota(private_db: str, tmp_path_factory: pytest.TempPathFactory, tiny) -> Iterator[Stack]:
    model_bytes = sum(p.stat().st_size for p in tiny["gpt2"].iterdir())
    # Room for two tiny models and a bit, not three.
    st = _stack(
        private_db,
        tmp_path_factory.mktemp("quota"),
        False,
        MODELPRESS_QUOTA_JOBS_IN_FLIGHT="2",
        MODELPRESS_QUOTA_STORAGE_BYTES=str(int(model_bytes * 2.5)),
        MODELPRESS_QUOTA_RETRY_AFTER_S="17",
    )
    yield st
    st.service.stop()


def test_jobs_in_flight_quota_is_429_with_retry_after_per_tenant(quota, tiny):
    c, other = quota.client(), quota.client(quota.other_key)
    model = upload_dir(c, tiny["gpt2"]).json()
    body = {"model_id": model["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}], **CHEAP}
    first = [c.post("/v1/jobs", json=body) for _ in range(2)]
    assert [r.status_code for r in first] == [202, 202]
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "17"
    assert r.json()["code"] == "quota_jobs_in_flight" and r.headers["content-type"].startswith(
        "application/problem+json"
    )
    assert c.get("/v1/jobs").json()["items"].__len__() == 2, "the refused job was not recorded"
    # A sweep that would pass the quota is refused whole.
    sweep = c.post(
        "/v1/sweeps",
        json={
            "model_id": model["id"],
            **CHEAP,
            "vary": {"steps[0].params.sparsity": [0.3, 0.5]},
            "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.1}}],
        },
    )
    assert sweep.status_code == 429 and sweep.json()["code"] == "quota_jobs_in_flight", sweep.text
    # Another tenant has its own quota.
    m2 = upload_dir(other, tiny["gpt2"]).json()
    assert other.post("/v1/jobs", json={**body, "model_id": m2["id"]}).status_code == 202
    # A finished job frees its slot.
    c.post(f"/v1/jobs/{first[0].json()['id']}/cancel")
    assert c.post("/v1/jobs", json=body).status_code == 202


def test_storage_quota_is_429_and_leaves_nothing_behind(quota, tiny):
    c = quota.client(quota.service.cli("keys", "create", "--tenant", f"store-{uuid.uuid4().hex[:6]}"))
    have = [upload_dir(c, tiny["gpt2"]).json() for _ in range(2)]
    before_rows, before_files = table_rows(quota, "models"), len(stored_files(quota))
    r = upload_dir(c, tiny["gpt2"])
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "quota_storage" and int(r.headers["retry-after"]) > 0
    assert table_rows(quota, "models") == before_rows and len(stored_files(quota)) == before_files
    model_bytes = sum(p.stat().st_size for p in tiny["gpt2"].iterdir())
    r = c.post("/v1/datasets", files={"file": ("d.txt", b"a line of text\n" * (model_bytes // 15 + 1))})
    assert r.status_code == 429 and r.json()["code"] == "quota_storage", r.text
    # Deleting a model makes room again.
    assert c.delete(f"/v1/models/{have[0]['id']}").status_code == 204
    assert upload_dir(c, tiny["gpt2"]).status_code == 201
