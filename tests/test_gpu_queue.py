"""Queues and GPUs: every worker registers itself (queues, device) and stays seen; a GPU job
waits for a GPU worker and says so; ``modelpress worker --queues gpu`` needs a CUDA device, runs
one job at a time in the solo pool, and takes the gpu queue's jobs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.helpers import MODELPRESS, stop_process, upload_dir, wait_job

pytestmark = pytest.mark.integration

WAITING = "waiting for a GPU worker (none has been seen)"


def _pg(stack) -> psycopg.Connection:
    return psycopg.connect(stack.database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def _workers(client) -> list[dict]:
    r = client.get("/v1/workers")
    assert r.status_code == 200, r.text
    return r.json()


def _wait_worker(client, pid: int, timeout: float = 120) -> dict:
    wid = f"{socket.gethostname()}:{pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = next((w for w in _workers(client) if w["id"] == wid), None)
        if row is not None:
            return row
        time.sleep(0.5)
    raise AssertionError(f"worker {wid} did not register: {_workers(client)}")


def _stage(client, job_id: str) -> str:
    one = client.get(f"/v1/jobs/{job_id}").json()["progress"]["stage"]
    listed = next(
        j
        for j in client.get("/v1/jobs", params={"status": "queued", "limit": 200}).json()["items"]
        if j["id"] == job_id
    )
    assert listed["progress"]["stage"] == one, "the list and the job agree"
    return one


def _insert_gpu_job(stack, model: dict, steps: list[dict]) -> str:
    """A queued job on the gpu queue, as submit would record it, with no message sent (only GPU
    methods route there, and the tree may have none yet)."""
    job_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    with _pg(stack) as conn:
        tenant = conn.execute("SELECT tenant_id FROM models WHERE id = %s", (model["id"],)).fetchone()[0]
        conn.execute(
            "INSERT INTO jobs (id, tenant_id, model_id, steps, evaluation, queue, status, attempt, cancel_requested,"
            " progress_stage, progress_fraction, created_at, enqueued_at)"
            " VALUES (%s, %s, %s, %s, %s, 'gpu', 'queued', 0, false, %s, 0, %s, %s)",
            (job_id, tenant, model["id"], json.dumps(steps), json.dumps({"enabled": False}), WAITING, now, now),
        )
    return job_id


def test_workers_needs_a_key(cluster):
    assert cluster.client(None).get("/v1/workers").status_code == 401
    assert cluster.client("mp_nope_nope").get("/v1/workers").status_code == 401


def test_cluster_worker_is_registered_and_live(cluster):
    c = cluster.client()
    worker = next(p for p in cluster.service.procs if "worker" in p.args)
    row = _wait_worker(c, worker.pid)
    assert set(row) == {
        "id",
        "hostname",
        "queues",
        "device",
        "started_at",
        "last_seen_at",
        "live",
        "memory_budget_bytes",
        "scratch_budget_bytes",
        "throughput",
        "runtimes",
    }
    # The optional runtimes this machine has (the worker runs in this virtualenv): onnxruntime is
    # in the worker extra; llama-cpp-python is not (docs/EXPORTS.md).
    import importlib.util

    assert row["runtimes"] == [m for m in ("llama_cpp", "onnxruntime") if importlib.util.find_spec(m) is not None]
    assert "onnxruntime" in row["runtimes"]
    # The budget a worker publishes (worker/budget.py): derived from the machine here, so positive.
    assert row["memory_budget_bytes"] > 0 and row["scratch_budget_bytes"] > 0
    assert row["hostname"] == socket.gethostname()
    assert (row["queues"], row["device"], row["live"]) == (["cpu"], "cpu", True)
    assert row["started_at"] <= row["last_seen_at"]
    # The operator view is the same for every tenant.
    other = next(w for w in _workers(cluster.client(cluster.other_key)) if w["id"] == row["id"])
    assert {**other, "last_seen_at": None} == {**row, "last_seen_at": None}


def test_gpu_worker_needs_cuda(cluster):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res = subprocess.run(
        [MODELPRESS, "worker", "--queues", "gpu"], env=cluster.service.env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0
    assert "no CUDA device: a gpu-queue worker needs one" in res.stderr


def test_gpu_worker_refuses_a_pool_and_unknown_queues(cluster):
    res = subprocess.run(
        [MODELPRESS, "worker", "--queues", "cpu,gpu", "--concurrency", "2"],
        env=cluster.service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "one process per GPU" in res.stderr
    res = subprocess.run(
        [MODELPRESS, "worker", "--queues", "tpu"], env=cluster.service.env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "unknown queue(s) tpu" in res.stderr


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny Llama with its tokenizer (GPU methods calibrate on text), wide enough for 128-column
    quantization groups."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_util import save_with_tokenizer, vocab

    torch.manual_seed(0)
    v = vocab()
    config = LlamaConfig(
        num_hidden_layers=1,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(v),
        max_position_embeddings=64,
        pad_token_id=v["[PAD]"],
        bos_token_id=v["[BOS]"],
        eos_token_id=v["[EOS]"],
    )
    return save_with_tokenizer(LlamaForCausalLM(config), tmp_path_factory.mktemp("gpu-llm") / "llama")


def test_awq_goes_to_the_cpu_queue_now_that_no_method_needs_a_gpu(cluster_no_worker, llm):
    # Issue 22: AWQ runs on CPU workers (a worker serving both queues tunes on its GPU), so no
    # method routes to the gpu queue; a job there (inserted below, as submit records one) still
    # says it waits for a GPU worker.
    c = cluster_no_worker.client()
    assert [m["name"] for m in c.get("/v1/methods").json() if m["needs_gpu"]] == []
    from tests.tokenizer_util import txt_dataset

    model = upload_dir(c, llm).json()
    ds = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())}).json()
    r = c.post(
        "/v1/jobs",
        json={"model_id": model["id"], "dataset_id": ds["id"], "steps": [{"method": "quantize.awq", "params": {}}]},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    try:
        assert (job["queue"], job["status"], job["progress"]["stage"]) == ("cpu", "queued", "queued")
    finally:  # no later worker of this run takes it
        c.post(f"/v1/jobs/{job['id']}/cancel")


def test_queued_gpu_job_stage_follows_the_registry(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    model = upload_dir(c, tiny["gpt2"]).json()
    job_id = _insert_gpu_job(cluster_no_worker, model, [{"method": "quantize.cast", "params": {"dtype": "float16"}}])
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    try:
        assert _stage(c, job_id) == WAITING
        with _pg(cluster_no_worker) as conn:
            now = datetime.now(UTC)
            conn.execute(
                "INSERT INTO workers (id, hostname, pid, queues, device, started_at, last_seen_at)"
                " VALUES (%s, %s, 1, %s, 'cuda:0 (test)', %s, %s)",
                (f"{ghost}:1", ghost, json.dumps(["gpu"]), now, now),
            )
            assert _stage(c, job_id) == "queued"
            conn.execute("UPDATE workers SET last_seen_at = %s WHERE id = %s", (now - timedelta(hours=1), f"{ghost}:1"))
            assert _stage(c, job_id).startswith("waiting for a GPU worker (none seen since ")
            assert next(w for w in _workers(c) if w["id"] == f"{ghost}:1")["live"] is False
    finally:
        with _pg(cluster_no_worker) as conn:
            conn.execute("DELETE FROM workers WHERE hostname = %s", (ghost,))
        c.post(f"/v1/jobs/{job_id}/cancel")


def test_gpu_queue_worker_takes_gpu_jobs(cluster_no_worker, tiny, tmp_path):
    """--allow-no-gpu runs the gpu-queue worker on this CPU-only machine: the solo pool, its
    registry row, the job it takes from the gpu queue, its row gone after a clean shutdown."""
    c = cluster_no_worker.client()
    env = cluster_no_worker.service.env
    model = upload_dir(c, tiny["gpt2"]).json()
    job_id = _insert_gpu_job(cluster_no_worker, model, [{"method": "quantize.cast", "params": {"dtype": "float16"}}])
    log = tmp_path / "gpu-worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [MODELPRESS, "worker", "--queues", "gpu", "--allow-no-gpu"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        row = _wait_worker(c, worker.pid)
        assert (row["queues"], row["device"], row["live"]) == (["gpu"], "cpu", True)
        assert "(solo)" in log.read_text(), "one job at a time, in the worker's own process"
        assert _stage(c, job_id) == "queued"

        send = f"from core.queue import enqueue_job; enqueue_job({job_id!r}, 'gpu')"
        subprocess.run([sys.executable, "-c", send], env=env, check=True, timeout=60)
        done = wait_job(c, job_id)
        assert (done["status"], done["queue"]) == ("succeeded", "gpu"), done
    finally:
        stop_process(worker, timeout=60)
    assert not [w for w in _workers(c) if w["id"] == row["id"]], "a clean shutdown removes the row"
