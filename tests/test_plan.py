"""Job plans and worker budgets (core/jobs/plan.py, worker/budget.py) on a cluster stack of its own
(its own database: a worker with a tiny budget must not refuse another stack's jobs), with real
workers started and stopped by the tests: ``POST /v1/jobs/estimate`` (checked like a submit),
the plan on the job resource, the refusal at submit and at the worker when no worker's budget
fits (``job_exceeds_worker_budget``), the SDK and the CLI, and the plan against the peak memory
real jobs measure."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.jobs import plan as planner
from core.methods import get as get_method
from tests.conftest import Stack, _cluster_env
from tests.helpers import MODELPRESS, Service, stop_process, upload_dir, wait_job
from tests.servers import private_database
from tests.tokenizer_util import _special_ids as special_ids
from tests.tokenizer_util import save_with_tokenizer, txt_dataset, vocab

NO_EVAL = {"enabled": False}
PRUNE = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]
PLAN_FIELDS = {
    "path",
    "peak_memory_bytes",
    "scratch_bytes",
    "artifact_bytes",
    "seconds",
    "model_bytes",
    "parameters",
    "largest_tensor_bytes",
    "baseline_bytes",
    "memory_factor",
    "evaluation",
    "throughput_bytes_per_s",
    "throughput_measured",
    "notes",
    "evaluation_mode",
}


@pytest.fixture(scope="module")
def plan_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API on a database of its own and no worker: each test starts the workers it needs."""
    data = tmp_path_factory.mktemp("plan")
    with private_database() as db:
        env = {
            **_cluster_env(db, data, f"mptest-plan-{uuid.uuid4().hex[:8]}:"),
            "MODELPRESS_MAX_UPLOAD_BYTES": str(512 * 2**20),
            # A job one worker leaves for another is re-sent soon.
            "MODELPRESS_REQUEUE_AFTER_S": "2",
            "MODELPRESS_RECONCILE_INTERVAL_S": "1",
        }
        svc = Service(env, data, worker=False)
        svc.cli("migrate")
        key = svc.cli("keys", "create", "--tenant", f"plan-{uuid.uuid4().hex[:6]}")
        svc.start()
        yield Stack("cluster", svc, key, key, data, db)
        svc.stop()


class Worker:
    """``modelpress worker`` with extra settings, stopped cleanly (its registry row goes with it)."""

    def __init__(self, stack: Stack, name: str, **env: str) -> None:
        log = (stack.data_dir / f"worker-{name}.log").open("ab")
        self.proc = subprocess.Popen(
            [MODELPRESS, "worker", "--concurrency", "1"],
            env={**stack.service.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.id: str | None = None
        c = stack.client()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (stack.data_dir / f"worker-{name}.log").read_text()[-3000:]
            mine = [w for w in c.get("/v1/workers").json() if w["id"].endswith(f":{self.proc.pid}")]
            if mine and mine[0]["memory_budget_bytes"] is not None and mine[0]["live"]:
                self.row = mine[0]
                self.id = mine[0]["id"]
                return
            time.sleep(0.3)
        raise AssertionError("the worker did not register with its budget")

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)


@pytest.fixture(scope="module")
def models(plan_stack: Stack, tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> dict[str, Any]:
    """Uploaded: the tiny GPT-2, a bare state dict, and two ~76 MB models with the tokenizer (big
    enough that the job's own memory is not lost next to the worker's ~0.5 GB baseline)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("plan-models")
    torch.manual_seed(0)
    n = len(vocab())
    ids = special_ids()
    mid = save_with_tokenizer(
        GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=n, n_positions=128, **ids)),
        root / "gpt2-mid",
    )
    llama = save_with_tokenizer(
        LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=6,
                hidden_size=512,
                intermediate_size=1408,
                num_attention_heads=8,
                num_key_value_heads=8,
                vocab_size=n,
                max_position_embeddings=128,
                **ids,
            )
        ),
        root / "llama-mid",
    )
    # Fewer, larger tensors (16.8 MB each in the MLP): the streaming path's memory follows the
    # largest tensor, not the model.
    wide = save_with_tokenizer(
        LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=8,
                num_key_value_heads=8,
                vocab_size=n,
                max_position_embeddings=128,
                **ids,
            )
        ),
        root / "llama-wide",
    )
    c = plan_stack.client()
    out = {
        name: upload_dir(c, path).json()
        for name, path in (("tiny", tiny["gpt2"]), ("gpt2-mid", mid), ("llama-mid", llama), ("llama-wide", wide))
    }
    bare = tiny["bare"]
    out["bare"] = c.post("/v1/models", files=[("files", (bare.name, bare.read_bytes()))]).json()
    out["data"] = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())}).json()
    for name, m in out.items():
        assert "id" in m, (name, m)
    return out


def _stream_expected(steps: list[dict]) -> str:
    from core.methods import load_all

    if planner.stream_capable(steps, load_all()):
        return "stream"
    return "blocks" if planner.blocks_capable("hf", steps, load_all()) else "whole"


# --- the estimate endpoint ---------------------------------------------------------------------


@pytest.mark.integration
def test_estimate_is_the_plan_from_the_headers(plan_stack: Stack, models: dict[str, Any]) -> None:
    c = plan_stack.client()
    tiny = models["tiny"]
    r = c.post("/v1/jobs/estimate", json={"model_id": tiny["id"], "steps": PRUNE, "evaluation": NO_EVAL})
    assert r.status_code == 200, r.text
    est = r.json()
    assert set(est) >= PLAN_FIELDS
    assert est["path"] == _stream_expected(PRUNE)
    # The tiny GPT-2 (2 layers, n_embd 64, vocab 500, 64 positions), fp32: its tensors' bytes.
    weights = next(f for f in tiny["files"] if f["name"] == "model.safetensors")["size_bytes"]
    assert 0 < weights - est["model_bytes"] < 20_000, "tensor bytes: the file less its header"
    assert est["parameters"] == tiny["parameters"]
    assert est["largest_tensor_bytes"] == 500 * 64 * 4, "the token embedding, in float32"
    assert est["peak_memory_bytes"] > est["baseline_bytes"] == planner.BASELINE_BYTES
    assert est["scratch_bytes"] >= est["artifact_bytes"] > 0
    assert est["evaluation"] is False and est["evaluation_peak_bytes"] is None
    assert est["seconds"] > 0 and est["throughput_measured"] is False
    assert est["fleet"] is None, "no worker has registered: the fleet's budget is unknown"
    # Nothing was submitted.
    assert c.get("/v1/jobs").json()["items"] == []

    # Evaluation adds its seconds (and may set the peak); casting halves fp32 weights.
    ev = c.post(
        "/v1/jobs/estimate", json={"model_id": tiny["id"], "steps": PRUNE, "evaluation": {"budget_s": 10}}
    ).json()
    assert ev["evaluation"] is True and ev["seconds"] >= est["seconds"] + 10
    assert ev["peak_memory_bytes"] >= est["peak_memory_bytes"]
    cast = c.post(
        "/v1/jobs/estimate",
        json={
            "model_id": models["bare"]["id"],
            "evaluation": NO_EVAL,
            "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}],
        },
    ).json()
    assert cast["artifact_bytes"] == cast["model_bytes"] // 2, "a bare state dict is stored as is: fp32 -> fp16"


@pytest.mark.integration
def test_estimate_of_packed_quantization(plan_stack: Stack, models: dict[str, Any]) -> None:
    """4-bit weight-only: half a byte per targeted weight plus a scale per group of 128."""
    llama = models["llama-mid"]
    est = (
        plan_stack.client()
        .post(
            "/v1/jobs/estimate",
            json={
                "model_id": llama["id"],
                "evaluation": NO_EVAL,
                "steps": [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}],
            },
        )
        .json()
    )
    linear = 6 * (4 * 512 * 512 + 3 * 512 * 1408)
    assert est["artifact_bytes"] < 0.2 * est["model_bytes"]
    assert abs(est["artifact_bytes"] - (linear / 2 + linear / 128 * 4)) < 0.1 * est["artifact_bytes"]


BAD_BODIES = [
    pytest.param({"steps": PRUNE}, id="no-model_id"),
    pytest.param({"model_id": "MODEL"}, id="no-steps"),
    pytest.param({"model_id": "MODEL", "steps": []}, id="empty-steps"),
    pytest.param({"model_id": "MODEL", "steps": [{"method": "nope"}]}, id="unknown-method"),
    pytest.param(
        {"model_id": "MODEL", "steps": [{"method": "prune.magnitude", "params": {"sparsity": 2}}]}, id="bad-param"
    ),
    pytest.param({"model_id": "MODEL", "steps": PRUNE, "surprise": 1}, id="extra-field"),
    pytest.param({"model_id": "MODEL", "steps": PRUNE, "dataset_id": "no-such-dataset"}, id="unknown-dataset"),
    pytest.param({"model_id": "no-such-model", "steps": PRUNE}, id="unknown-model"),
    pytest.param(
        {"model_id": "MODEL", "steps": [{"method": "quantize.weight_only", "params": {"bits": 4}}]},
        id="unsupported-model",
    ),  # GPT-2's Conv1D
]


@pytest.mark.integration
@pytest.mark.parametrize("body", BAD_BODIES)
def test_estimate_refuses_what_submit_refuses(plan_stack: Stack, models: dict[str, Any], body: dict[str, Any]) -> None:
    c = plan_stack.client()
    body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(models["tiny"]["id"])))
    est, sub = c.post("/v1/jobs/estimate", json=body), c.post("/v1/jobs", json=body)
    assert est.status_code == sub.status_code == 422, (est.text, sub.text)
    assert est.headers["content-type"] == "application/problem+json"
    assert est.json()["code"] == sub.json()["code"]
    assert [e["loc"] for e in est.json().get("errors", [])] == [e["loc"] for e in sub.json().get("errors", [])]


@pytest.mark.integration
def test_estimate_refuses_an_unparseable_body_and_no_key(plan_stack: Stack) -> None:
    c = plan_stack.client()
    r = c.post("/v1/jobs/estimate", content=b"\xff{", headers={"content-type": "application/json"})
    assert (
        r.status_code == c.post("/v1/jobs", content=b"\xff{", headers={"content-type": "application/json"}).status_code
    )
    assert r.status_code in (400, 422)
    assert plan_stack.service.client(None).post("/v1/jobs/estimate", json={}).status_code == 401


@pytest.mark.integration
def test_the_job_resource_shows_its_plan(plan_stack: Stack, models: dict[str, Any]) -> None:
    c = plan_stack.client()
    body = {"model_id": models["tiny"]["id"], "steps": PRUNE, "evaluation": NO_EVAL}
    est = c.post("/v1/jobs/estimate", json=body).json()
    job = c.post("/v1/jobs", json=body).json()
    assert job["plan"] == {k: v for k, v in est.items() if k != "fleet"}
    assert c.get(f"/v1/jobs/{job['id']}").json()["plan"] == job["plan"]
    listed = next(j for j in c.get("/v1/jobs").json()["items"] if j["id"] == job["id"])
    assert listed["plan"] == job["plan"]
    c.post(f"/v1/jobs/{job['id']}/cancel")


# --- evaluation as it will run -------------------------------------------------------------------


def _tensors(layers: int, hidden: int, vocab: int) -> list[planner.Tensor]:
    t = [
        planner.Tensor("model.embed_tokens.weight", "F32", (vocab, hidden)),
        planner.Tensor("lm_head.weight", "F32", (vocab, hidden)),
    ]
    for i in range(layers):
        t += [
            planner.Tensor(f"model.layers.{i}.mlp.up_proj.weight", "F32", (4 * hidden, hidden)),
            planner.Tensor(f"model.layers.{i}.self_attn.q_proj.weight", "F32", (hidden, hidden)),
        ]
    return t


@pytest.mark.unit
def test_the_plan_counts_evaluation_as_it_will_run() -> None:
    """Whole (both models loaded in turn), streamed (weights on disk: a module at a time, when the
    worker's budget cannot hold the model 3x) or skipped (a bare state dict has nothing to run)."""
    tensors = _tensors(8, 256, 1000)
    model_bytes = sum(t.nbytes for t in tensors)
    wo4 = [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}]
    common = {
        "tensors": tensors,
        "other_bytes": 0,
        "input_bytes": model_bytes,
        "steps": wo4,
        "evaluation": {"enabled": True, "seq_len": 32, "budget_s": 15},
        "stream": True,
        "input_on_scratch": False,
    }
    unknown = planner.compute(fmt="hf", **common)
    roomy = planner.compute(fmt="hf", memory_bytes=planner.BASELINE_BYTES + 4 * model_bytes, **common)
    tight = planner.compute(fmt="hf", memory_bytes=planner.BASELINE_BYTES + 2 * model_bytes, **common)
    bare = planner.compute(fmt="safetensors", memory_bytes=planner.BASELINE_BYTES + 4 * model_bytes, **common)
    off = planner.compute(fmt="hf", **{**common, "evaluation": {"enabled": False}})
    assert unknown["evaluation_mode"] == roomy["evaluation_mode"] == "whole"
    assert roomy["evaluation_peak_bytes"] == unknown["evaluation_peak_bytes"]
    assert any("no worker budget known" in n for n in unknown["notes"])
    assert tight["evaluation_mode"] == "streamed"
    largest = max(t.nbytes for t in tensors)
    assert tight["evaluation_peak_bytes"] == (
        planner.BASELINE_BYTES
        + int(planner.EVAL_STREAMED_FACTOR * largest)
        + planner.EVAL_LOGITS_COPIES * 32 * 1000 * 4
    )
    assert tight["evaluation_peak_bytes"] < roomy["evaluation_peak_bytes"]
    assert tight["peak_memory_bytes"] < roomy["peak_memory_bytes"]
    # The artifact decompressed into its offload folder: float bytes of scratch.
    assert tight["scratch_bytes"] == roomy["scratch_bytes"] + model_bytes
    assert tight["seconds"] == roomy["seconds"], "the same budget"
    assert bare["evaluation_mode"] == "skipped" and bare["evaluation_peak_bytes"] is None
    assert bare["peak_memory_bytes"] == off["peak_memory_bytes"] < roomy["peak_memory_bytes"]
    assert off["evaluation_mode"] == "off"
    # The whole path holds the model for its steps anyway: it evaluates whole, whatever the budget.
    whole = planner.compute(
        fmt="hf", memory_bytes=planner.BASELINE_BYTES + 2 * model_bytes, **{**common, "stream": False}
    )
    assert whole["path"] == "whole" and whole["evaluation_mode"] == "whole"


@pytest.mark.integration
def test_a_worker_that_cannot_hold_the_model_twice_evaluates_it_on_disk(
    plan_stack: Stack, models: dict[str, Any]
) -> None:
    """A worker whose memory budget is under its baseline + 3x the model's weights (but over the
    job's plan): the plan says ``streamed``, the job runs both models with their weights on disk
    and the report has quality and fidelity, no latency, and says how it measured."""
    c = plan_stack.client()
    llama = models["llama-mid"]
    wo4 = [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}]
    evaluation = {"max_samples": 6, "budget_s": 120}
    body = {"model_id": llama["id"], "steps": wo4, "evaluation": evaluation}
    model_bytes = c.post("/v1/jobs/estimate", json=body).json()["model_bytes"]
    budget_mb = (planner.BASELINE_BYTES + int(1.5 * model_bytes)) // 2**20
    worker = Worker(plan_stack, "evalstream", MODELPRESS_WORKER_MEMORY_BUDGET_MB=str(budget_mb))
    try:
        est = c.post("/v1/jobs/estimate", json=body).json()
        assert est["fleet"]["fits"] is True, est
        assert est["evaluation_mode"] == "streamed" and any("streamed" in n for n in est["notes"]), est
        job = c.post("/v1/jobs", json=body).json()
        job = wait_job(c, job["id"], timeout=300)
        assert job["status"] == "succeeded", job
    finally:
        worker.stop()
    m = job["metrics"]
    assert "evaluate_streamed" in m["stage_seconds"] and "evaluate_original" not in m["stage_seconds"]
    q, f, sp = m["quality"], m["fidelity"], m["speed"]
    assert q["available"] and f["available"], (q, f)
    assert q["weights_on_disk"] is True and f["weights_on_disk"] is True
    assert q["samples"] == f["samples"] == 6 and q["ci95"]["ratio"] is not None
    assert f["kl_mean"] > 0
    assert sp["available"] is False and "on disk" in sp["reason"]
    # The job's peak stays within the plan's (its baseline dominates on a 76 MB model).
    assert _peak(job) <= 1.3 * job["plan"]["peak_memory_bytes"], (m["memory"], job["plan"])


# --- budgets -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_job_over_every_budget_is_refused_and_a_queued_one_fails(plan_stack: Stack, models: dict[str, Any]) -> None:
    c = plan_stack.client()
    body = {"model_id": models["gpt2-mid"]["id"], "steps": PRUNE, "evaluation": NO_EVAL}
    # Accepted while no worker is known: the worker decides.
    early = c.post("/v1/jobs", json=body)
    assert early.status_code == 202, early.text
    plan = early.json()["plan"]
    # A worker whose memory budget is below the plan's peak (but above a tiny job's).
    budget_mb = (plan["baseline_bytes"] + plan["peak_memory_bytes"]) // 2 // 2**20
    small = Worker(plan_stack, "small", MODELPRESS_WORKER_MEMORY_BUDGET_MB=str(budget_mb))
    try:
        assert small.row["memory_budget_bytes"] == budget_mb * 2**20
        assert small.row["scratch_budget_bytes"] > 0, "scratch budget read from the machine's free disk"
        # The job queued before it came: failed at the worker, unclaimed, with the figures.
        job = wait_job(c, early.json()["id"], timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == "job_exceeds_worker_budget", job
        assert job["attempt"] == 0, "never claimed"
        assert f"{plan['peak_memory_bytes'] / 2**30:.2f} GiB" in job["error"]["message"]
        assert f"{budget_mb * 2**20 / 2**30:.2f} GiB" in job["error"]["message"]

        # Now the fleet's budget is known: the estimate says it does not fit, a submit is refused.
        est = c.post("/v1/jobs/estimate", json=body).json()
        assert est["fleet"] == {
            "queue": "cpu",
            "workers": 1,
            "memory_bytes": budget_mb * 2**20,
            "scratch_bytes": small.row["scratch_budget_bytes"],
            "fits": False,
        }
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert (
            problem["type"] == "/problems/job_exceeds_worker_budget" and problem["code"] == "job_exceeds_worker_budget"
        )
        assert problem["required"] == {
            "memory_bytes": plan["peak_memory_bytes"],
            "scratch_bytes": plan["scratch_bytes"],
            "path": plan["path"],
        }
        assert problem["available"]["memory_bytes"] == budget_mb * 2**20
        assert f"{plan['peak_memory_bytes'] / 2**30:.2f} GiB of memory" in problem["detail"]

        # A job that fits runs on it (too small a model to learn a throughput from).
        fits = c.post("/v1/jobs", json={**body, "model_id": models["tiny"]["id"]})
        assert fits.status_code == 202, fits.text
        assert wait_job(c, fits.json()["id"], timeout=120)["status"] == "succeeded"

        # A bigger worker joins: the fleet fits the job again, and the big worker runs it and
        # records its throughput. (The small worker is stopped first: a job it is handed is left
        # queued for the big one and re-sent by the reconciler, and whichever worker's consumer
        # takes the re-sent message is a race the small one kept winning in one run for 3
        # minutes: a starvation the closing note of issue 14 hands to issue 15.)
        big = Worker(plan_stack, "big")
        try:
            assert c.post("/v1/jobs/estimate", json=body).json()["fleet"]["fits"] is True
            small.stop()
            ids = [c.post("/v1/jobs", json=body).json()["id"] for _ in range(3)]
            for job_id in ids:
                job = wait_job(c, job_id, timeout=180)
                assert job["status"] == "succeeded", job
            rows = {w["id"]: w for w in c.get("/v1/workers").json()}
            assert small.id not in rows  # stopped cleanly: its row went with it
            assert rows[big.id]["throughput"][plan["path"]]["jobs"] == 3
            assert rows[big.id]["throughput"][plan["path"]]["bytes_per_s"] > 0
            est = c.post("/v1/jobs/estimate", json=body).json()
            assert est["throughput_measured"] is True
            assert est["throughput_bytes_per_s"] == rows[big.id]["throughput"][plan["path"]]["bytes_per_s"]
        finally:
            big.stop()
    finally:
        small.stop()


# --- SDK and CLI -------------------------------------------------------------------------------


@pytest.mark.integration
def test_sdk_and_cli_estimate(plan_stack: Stack, models: dict[str, Any]) -> None:
    from modelpress import Client, Estimate, Unprocessable

    tiny = models["tiny"]["id"]
    with Client(plan_stack.service.url, plan_stack.key) as mp:
        est = mp.estimate(tiny, [("prune.magnitude", {"sparsity": 0.5})], evaluation={"enabled": False})
        assert isinstance(est, Estimate) and est.path == _stream_expected(PRUNE)
        assert est.peak_memory_bytes > est.baseline_bytes and est.model_bytes > 0
        job = mp.submit(tiny, [("prune.magnitude", {"sparsity": 0.5})], evaluation={"enabled": False})
        assert job.plan is not None and job.plan.peak_memory_bytes == est.peak_memory_bytes
        mp.cancel(job)
        with pytest.raises(Unprocessable) as e:
            mp.estimate(tiny, [("no.such.method", {})])
        assert e.value.code == "validation_error"

    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"MODELPRESS_URL": plan_stack.service.url, "MODELPRESS_API_KEY": plan_stack.key})

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MODELPRESS, "jobs", "estimate", tiny, *args], env=env, capture_output=True, text=True, timeout=60
        )

    res = cli("--step", "prune.magnitude:sparsity=0.5", "--no-eval", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["peak_memory_bytes"] == est.peak_memory_bytes and out["evaluation"] is False
    res = cli("--step", "quantize.cast:dtype=bfloat16")
    assert res.returncode == 0, res.stderr
    for label in ("path", "peak memory", "scratch disk", "artifact", "seconds", "workers"):
        assert label in res.stdout
    res = cli("--step", "no.such.method", "--json")
    assert res.returncode == 3 and json.loads(res.stdout)["error"]["status"] == 422
    # `modelpress jobs` without the subcommand still lists jobs.
    listed = subprocess.run(
        [MODELPRESS, "jobs", "--json", "--limit", "5"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and isinstance(json.loads(listed.stdout), list)


# --- the plan against real jobs ----------------------------------------------------------------

# (model, steps, evaluation): on a fresh worker each, so no earlier job's freed-but-kept heap
# (glibc keeps it for reuse) hides this job's memory.
QUICK_EVAL = {"runs": 1, "warmup": 0, "max_samples": 8, "seq_len": 32, "budget_s": 5}
WANDA = [{"method": "prune.wanda", "params": {"sparsity": 0.5, "num_samples": 16, "max_length": 32}}]
W4 = [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}]
MEASURED = [
    ("llama-wide", PRUNE, NO_EVAL),
    ("llama-wide", W4, NO_EVAL),
    ("llama-mid", WANDA, NO_EVAL),
    ("llama-wide", PRUNE, QUICK_EVAL),
]
# MODELPRESS_TEST_PLAN_CALIBRATE=1: every method, figures printed and not asserted (how the
# constants of core/jobs/plan.py were measured).
CALIBRATE = os.environ.get("MODELPRESS_TEST_PLAN_CALIBRATE") == "1"
if CALIBRATE:
    MEASURED = [
        ("llama-wide", PRUNE, NO_EVAL),
        ("llama-wide", [{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}], NO_EVAL),
        ("llama-wide", W4, NO_EVAL),
        ("llama-wide", [{"method": "quantize.dynamic_int8", "params": {}}], NO_EVAL),
        ("llama-wide", [{"method": "quantize.fixed_point", "params": {"frac_bits": 6}}], NO_EVAL),
        ("llama-mid", WANDA, NO_EVAL),
        ("llama-mid", [{"method": "prune.structured", "params": {"ffn": 0.5}}], NO_EVAL),
        (
            "llama-mid",
            [{"method": "quantize.gptq", "params": {"scheme": "W4A16", "num_samples": 16, "max_length": 32}}],
            NO_EVAL,
        ),
        ("llama-mid", [{"method": "quantize.smoothquant", "params": {"num_samples": 16, "max_length": 32}}], NO_EVAL),
        (
            "llama-mid",
            [{"method": "distill", "params": {"layers": 3, "steps": 5, "batch_size": 4, "max_length": 32}}],
            NO_EVAL,
        ),
        ("llama-wide", PRUNE, QUICK_EVAL),
        ("llama-wide", W4, QUICK_EVAL),
        ("llama-mid", WANDA, QUICK_EVAL),
    ]


def _peak(job: dict[str, Any]) -> int:
    memory = job["metrics"]["memory"]
    return memory.get("peak_anon_bytes") or memory["peak_rss_bytes"]


@pytest.mark.integration
def test_plan_is_within_30_percent_of_the_measured_peak(plan_stack: Stack, models: dict[str, Any]) -> None:
    """The plan's peak above the baseline against the measured peak above the measured baseline,
    within ±30 %. The part above the baseline is what the plan predicts from the model: the
    baseline (~0.5 GB: torch, transformers) would otherwise dwarf a 76 MB model's ~100-200 MB and
    any figure would pass. The measured baseline is the peak of a tiny job (75 KB of weights) run
    first on the same fresh worker; the measured peak is the job's ``peak_anon_bytes`` when the
    worker reports it, else ``peak_rss_bytes`` (VmHWM since the job started); an in-memory
    (``whole``) job is run twice and the larger peak kept. Whole-process peaks are compared too
    (they are within ±30 % a fortiori)."""
    c = plan_stack.client()

    def measure(model: str, steps: list[dict], evaluation: dict) -> tuple[dict, int]:
        """The job (on a fresh worker) and the measured baseline (a tiny job's peak before it)."""
        worker = Worker(plan_stack, f"measure-{uuid.uuid4().hex[:6]}")
        try:
            base_job = c.post(
                "/v1/jobs", json={"model_id": models["tiny"]["id"], "steps": PRUNE, "evaluation": NO_EVAL}
            ).json()
            base = wait_job(c, base_job["id"], timeout=120)
            assert base["status"] == "succeeded", base
            body = {"model_id": models[model]["id"], "steps": steps, "evaluation": evaluation}
            if any(get_method(st["method"]).needs_data for st in steps):
                body["dataset_id"] = models["data"]["id"]
            job = c.post("/v1/jobs", json=body).json()
            job = wait_job(c, job["id"], timeout=600)
            assert job["status"] == "succeeded", job
        finally:
            worker.stop()
        return job, _peak(base)

    rows = []
    for model, steps, evaluation in MEASURED:
        job, base_peak = measure(model, steps, evaluation)
        if job["plan"]["path"] in ("whole", "blocks") and not CALIBRATE:
            # The in-memory path's anonymous peak varies between runs of the same job (one in four
            # wanda runs read 40 % lower, with the same resident peak: part of the weights stayed
            # file-mapped, or a short peak fell between two 20 ms samples): its peak is the larger of two.
            again, again_base = measure(model, steps, evaluation)
            if _peak(again) - again_base > _peak(job) - base_peak:
                job, base_peak = again, again_base
        plan = job["plan"]
        measured_above = _peak(job) - base_peak
        planned_above = plan["peak_memory_bytes"] - plan["baseline_bytes"]
        rows.append(
            (
                f"{model} {steps[0]['method']} ({plan['path']}{', eval' if evaluation.get('enabled', True) else ''})",
                plan["peak_memory_bytes"],
                _peak(job),
                planned_above,
                measured_above,
                plan["artifact_bytes"],
                job["artifact"]["size_bytes"],
            )
        )
        print(
            f"\n{rows[-1][0]}: base {base_peak / 2**20:.0f} MiB, model {plan['model_bytes'] / 2**20:.1f} MiB, largest "
            f"tensor {plan['largest_tensor_bytes'] / 2**20:.1f} MiB, above base {measured_above / 2**20:.1f} MiB, "
            f"stage_seconds {job['metrics']['stage_seconds']}, memory {job['metrics']['memory']}, scratch plan "
            f"{plan['scratch_bytes'] / 2**20:.1f} MiB, seconds plan {plan['seconds']}",
            flush=True,
        )
    print(
        "\njob | planned peak | measured peak | planned above baseline | measured above baseline | ratio | "
        "planned artifact | artifact"
    )
    for name, pp, mp_, pa, ma, art_p, art in rows:
        print(
            f"{name} | {pp / 2**20:.0f} MiB | {mp_ / 2**20:.0f} MiB | {pa / 2**20:.0f} MiB | {ma / 2**20:.0f} MiB | "
            f"{pa / max(ma, 1):.2f} | {art_p / 1e6:.2f} MB | {art / 1e6:.2f} MB"
        )
    if CALIBRATE:
        return
    for name, pp, mp_, pa, ma, _art_p, _art in rows:
        assert 0.7 * ma <= pa <= 1.3 * ma, (
            f"{name}: planned {pa / 2**20:.0f} MiB above the baseline, measured {ma / 2**20:.0f} MiB"
        )
        assert 0.7 * mp_ <= pp <= 1.3 * mp_, name
