"""Upload → job → poll → download → load with plain transformers, in cluster mode (Postgres,
Redis, a real Celery worker) and embedded mode (SQLite, SQLAlchemy transport, worker subprocess)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import upload_dir, wait_job
from tests.hfcheck import hf_stats

pytestmark = pytest.mark.e2e

HFCHECK = Path(__file__).with_name("hfcheck.py")


def load_artifact(zip_bytes: bytes, dest: Path, isolated: bool = False) -> dict:
    """Unzip and load with plain transformers; ``isolated`` does it in a fresh interpreter that
    never imports modelpress (slow: a new torch import), otherwise in this process."""
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        names = zf.namelist()
        assert "config.json" in names and "model.safetensors" in names and "modelpress.json" in names, names
        zf.extractall(dest)
    if isolated:
        res = subprocess.run([sys.executable, str(HFCHECK), str(dest)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        stats = json.loads(res.stdout.strip().splitlines()[-1])
        assert stats["modelpress_imported"] is False
        return stats
    return hf_stats(str(dest))


@pytest.mark.parametrize(
    ("model", "step", "expect"),
    [
        ("gpt2", {"method": "prune.magnitude", "params": {"sparsity": 0.5}}, {"sparsity": 0.5, "isolated": True}),
        ("bert", {"method": "prune.magnitude", "params": {"sparsity": 0.3}}, {"sparsity": 0.3}),
        ("gpt2", {"method": "quantize.cast", "params": {"dtype": "float16"}}, {"dtypes": ["torch.float16"]}),
        ("bert", {"method": "quantize.cast", "params": {"dtype": "bfloat16"}}, {"dtypes": ["torch.bfloat16"]}),
        ("llama", {"method": "prune.magnitude", "params": {"sparsity": 0.5, "scope": "layer"}}, {"sparsity": 0.5}),
        ("llama", {"method": "prune.magnitude", "params": {"sparsity": 0.5, "scope": "row"}}, {"sparsity": 0.5}),
        ("llama", {"method": "quantize.cast", "params": {"dtype": "bfloat16"}}, {"dtypes": ["torch.bfloat16"]}),
    ],
)
def test_hf_model_round_trip(stack, tiny, tmp_path, model, step, expect):
    c = stack.client()
    r = upload_dir(c, tiny[model])
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["format"] == "hf" and m["architecture"] in ("GPT2LMHeadModel", "BertModel", "LlamaForCausalLM")
    assert m["parameters"] > 0 and len(m["sha256"]) == 64
    assert m["size_bytes"] == sum(p.stat().st_size for p in tiny[model].iterdir())

    r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": [step], "name": f"{model}-{step['method']}"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert r.json()["status"] == "queued"
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1 and job["progress"] == {"stage": "done", "fraction": 1.0}
    assert job["started_at"] and job["finished_at"]

    dl = c.get(f"/v1/jobs/{job['id']}/artifact")
    assert dl.status_code == 200
    assert int(dl.headers["content-length"]) == len(dl.content) == job["artifact"]["size_bytes"]
    assert dl.headers["etag"] == f'"{job["artifact"]["sha256"]}"'
    import hashlib

    assert hashlib.sha256(dl.content).hexdigest() == job["artifact"]["sha256"]
    got = load_artifact(dl.content, tmp_path / "out", isolated=expect.get("isolated", False))
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(dl.content)).read("modelpress.json"))
    assert manifest["steps"][0]["method"] == step["method"] and manifest["input"]["sha256"] == m["sha256"]
    assert {"torch", "transformers", "modelpress"} <= set(manifest["versions"])
    if "sparsity" in expect:
        assert got["sparsity"] == pytest.approx(expect["sparsity"], abs=0.005)
        assert job["metrics"]["sparsity"]["sparsity"] == pytest.approx(expect["sparsity"], abs=0.005)
        assert job["metrics"]["steps"][0]["achieved_sparsity"] == pytest.approx(expect["sparsity"], abs=0.005)
    else:
        assert got["dtypes"] == expect["dtypes"]
        # Half the bytes: the fp32 weights dominate these models.
        assert job["metrics"]["size"]["artifact_bytes"] < 0.6 * m["size_bytes"]


def test_bare_safetensors_round_trip(stack, tiny):
    from safetensors.torch import load

    c = stack.client()
    path = tiny["bare"]
    r = c.post("/v1/models", files=[("files", (path.name, path.read_bytes()))])
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["format"] == "safetensors" and m["architecture"] is None
    assert m["parameters"] == 64 * 64 + 32 * 64 + 64 + 100 * 64
    assert m["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={"model_id": m["id"], "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]},
        ).json()["id"],
    )
    assert job["status"] == "succeeded", job
    data = c.get(f"/v1/jobs/{job['id']}/artifact").content
    sd = load(data)
    targets = ["encoder.layer.0.weight", "encoder.layer.1.weight"]
    zeros = sum(int((sd[k] == 0).sum()) for k in targets)
    assert zeros == round(0.5 * (64 * 64 + 32 * 64))
    assert int((sd["embed.weight"] == 0).sum()) == 0, "embeddings are not pruned"
    assert int((sd["encoder.layer.0.bias"] == 0).sum()) == 0, "biases are not pruned"


def test_range_download_and_resume(stack, tiny):
    c = stack.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={"model_id": m["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}]},
        ).json()["id"],
    )
    full = c.get(f"/v1/jobs/{job['id']}/artifact").content
    size = len(full)
    part = c.get(f"/v1/jobs/{job['id']}/artifact", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == full[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{size}"
    rest = c.get(f"/v1/jobs/{job['id']}/artifact", headers={"Range": "bytes=100-"})
    assert rest.status_code == 206 and part.content + rest.content == full
    tail = c.get(f"/v1/jobs/{job['id']}/artifact", headers={"Range": "bytes=-10"})
    assert tail.content == full[-10:]
    bad = c.get(f"/v1/jobs/{job['id']}/artifact", headers={"Range": f"bytes={size}-"})
    assert bad.status_code == 416 and bad.headers["content-type"] == "application/problem+json"


def test_artifact_is_deterministic(cluster, tiny):
    """Same model, same steps: byte-identical artifacts (the manifest has no times or ids)."""
    c = cluster.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    shas = []
    for _ in range(2):
        job = wait_job(
            c,
            c.post(
                "/v1/jobs",
                json={"model_id": m["id"], "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.4}}]},
            ).json()["id"],
        )
        shas.append(job["artifact"]["sha256"])
    assert shas[0] == shas[1]
