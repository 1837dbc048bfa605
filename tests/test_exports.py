"""Output formats (issue 19): the job spec's ``output`` through the API, refusals at submit, and
whole jobs whose artifact is a GGUF or ONNX export (worker/exporting.py)."""

from __future__ import annotations

import pytest

from tests.helpers import upload_dir, wait_job

pytestmark = pytest.mark.integration

CAST = [{"method": "quantize.cast", "params": {"dtype": "float16"}}]


def test_output_defaults_to_safetensors_and_is_shown(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = c.post("/v1/jobs", json={"model_id": m["id"], "steps": CAST}).json()
    assert job["output"] == {"format": "safetensors"}
    again = c.get(f"/v1/jobs/{job['id']}").json()
    assert again["output"] == {"format": "safetensors"}
    r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": CAST, "output": {"format": "onnx"}})
    assert r.status_code == 202, r.text
    assert r.json()["output"] == {"format": "onnx", "quantize": None, "reduce_range": True}
    assert c.post(f"/v1/jobs/{r.json()['id']}/cancel").status_code == 200
    # This model has no tokenizer: a GGUF file must carry one.
    r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": CAST, "output": {"format": "gguf", "type": "F16"}})
    assert r.status_code == 422 and r.json()["code"] == "output_unsupported", r.text
    assert any("tokenizer" in e["msg"] for e in r.json()["errors"]), r.json()


def test_output_is_validated_at_submit(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    for bad, loc in (
        ({"format": "tflite"}, ["body", "output"]),
        ({"format": "gguf", "type": "Q3_XS"}, ["body", "output", "gguf", "type"]),
        ({"format": "onnx", "quantize": "int4"}, ["body", "output", "onnx", "quantize"]),
        (
            {"format": "onnx", "quantize": "int8_dynamic", "reduce_range": "no"},
            ["body", "output", "onnx", "reduce_range"],
        ),
        ({"format": "gguf", "quantize": "int8_dynamic"}, ["body", "output", "gguf", "quantize"]),
    ):
        r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": CAST, "output": bad})
        assert r.status_code == 422, (bad, r.text)
        assert [e["loc"] for e in r.json()["errors"]][0][: len(loc)] == loc, (bad, r.json())

    # A bare state dict has no architecture or tokenizer to export: refused with the reason.
    bare = c.post("/v1/models", files=[("files", ("weights.safetensors", tiny["bare"].read_bytes()))]).json()
    for fmt in ("gguf", "onnx"):
        r = c.post("/v1/jobs", json={"model_id": bare["id"], "steps": CAST, "output": {"format": fmt}})
        body = r.json()
        assert r.status_code == 422 and body["code"] == "output_unsupported", r.text
        assert "bare safetensors" in body["errors"][0]["msg"]
        assert body["errors"][0]["loc"] == ["body", "output"]
    # Nothing was recorded by a refused submit.
    names = {j["id"] for j in c.get("/v1/jobs").json()["items"] if j["model_id"] == bare["id"]}
    assert names == set()


def test_estimate_checks_output_too(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    bare = c.post("/v1/models", files=[("files", ("weights.safetensors", tiny["bare"].read_bytes()))]).json()
    r = c.post("/v1/jobs/estimate", json={"model_id": bare["id"], "steps": CAST, "output": {"format": "gguf"}})
    assert r.status_code == 422 and r.json()["code"] == "output_unsupported", r.text


def _bpe_llama(path, layers: int, hidden: int, intermediate: int):
    """A tiny bfloat16 Llama with the byte-level BPE tokenizer and chat template a GGUF
    vocabulary can hold (tests/test_export_gguf.py builds the same), saved at ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_export_gguf import VOCAB, _tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def kquant_llama(tmp_path_factory):
    """Every row length a multiple of 256 (what a K-quant block holds): only the fleet decides
    whether a Q4_K_M export of it is accepted."""
    return _bpe_llama(tmp_path_factory.mktemp("kquant-llama") / "llama", layers=1, hidden=256, intermediate=512)


def test_q4_k_m_needs_a_live_worker_with_llama_cpp(cluster_no_worker, kquant_llama):
    """GGUF Q4_K_M is written by llama.cpp's own quantizer: refused at submit (and estimate) with
    422 output_runtime_unavailable when the queue's live workers all published their runtimes and
    none has llama_cpp; accepted when one has it, or when the fleet is unknown (no live worker, or
    one that published nothing). Other GGUF types need no runtime. Other tests' workers may be
    live in this database, so each answer is checked against the rule applied to
    GET /v1/workers (tests/test_fleet_runtimes.py checks the rule on fleets of its own)."""
    import json
    import uuid
    from datetime import UTC, datetime

    import psycopg

    c = cluster_no_worker.client()
    m = upload_dir(c, kquant_llama).json()
    spec = {"model_id": m["id"], "output": {"format": "gguf", "type": "Q4_K_M"}}
    url = cluster_no_worker.database_url.replace("postgresql+psycopg://", "postgresql://")
    rows = [f"fake-{uuid.uuid4().hex[:8]}:{i}" for i in (1, 2)]

    def put(worker_id: str, runtimes: list[str] | None) -> None:
        now = datetime.now(UTC)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO workers (id, hostname, pid, queues, device, started_at, last_seen_at, runtimes)"
                " VALUES (%s, 'fake', 1, '[\"cpu\"]', 'cpu', %s, %s, %s) ON CONFLICT (id) DO UPDATE"
                " SET runtimes = EXCLUDED.runtimes, last_seen_at = EXCLUDED.last_seen_at",
                (worker_id, now, now, None if runtimes is None else json.dumps(runtimes)),
            )

    def expected() -> int:
        live = [w for w in c.get("/v1/workers").json() if w["live"] and "cpu" in w["queues"]]
        unknown = not live or any(w["runtimes"] is None for w in live)
        return 202 if unknown or any("llama_cpp" in w["runtimes"] for w in live) else 422

    def check() -> int:
        want = expected()
        for route in ("/v1/jobs", "/v1/jobs/estimate"):
            r = c.post(route, json=spec)
            assert r.status_code == (200 if want == 202 and route.endswith("estimate") else want), (route, r.text)
            if want == 422:
                body = r.json()
                assert body["code"] == "output_runtime_unavailable", body
                assert "llama-cpp-python" in body["detail"] and body["errors"][0]["loc"] == ["body", "output"], body
            elif route == "/v1/jobs":
                assert c.post(f"/v1/jobs/{r.json()['id']}/cancel").status_code == 200
        return want

    try:
        check()
        put(rows[0], ["onnxruntime"])
        answers = [check()]
        other = c.post("/v1/jobs", json={**spec, "output": {"format": "gguf", "type": "Q8_0"}})
        assert other.status_code == 202, other.text
        assert c.post(f"/v1/jobs/{other.json()['id']}/cancel").status_code == 200
        put(rows[1], None)  # a worker of an older version: it may have anything
        assert check() == 202
        put(rows[1], ["llama_cpp", "onnxruntime"])
        assert check() == 202
        workers = {w["id"]: w for w in c.get("/v1/workers").json()}
        assert workers[rows[0]]["runtimes"] == ["onnxruntime"], workers
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            # This machine's workers (this virtualenv) have no llama.cpp: with the fake worker
            # beside them, the refusal was seen.
            assert answers == [422]
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM workers WHERE id = ANY(%s)", (rows,))


# --- whole jobs through the real worker ---------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    """A tiny bfloat16 Llama (hidden 64, 2 layers; bfloat16 as LLM checkpoints are, so its 4-bit
    scales are float16 values and a Q4_0 export is exact) with a byte-level BPE tokenizer and a
    chat template: what a GGUF vocabulary can hold (tests/test_export_gguf.py builds the same)."""
    return _bpe_llama(tmp_path_factory.mktemp("bpe-llama") / "llama", layers=2, hidden=64, intermediate=128)


def _files(c, job_id: str, fmt: str) -> dict[str, int]:
    r = c.get(f"/v1/jobs/{job_id}/artifact/files")
    assert r.status_code == 200, r.text
    assert r.json()["format"] == fmt, r.json()
    return {f["name"]: f["size_bytes"] for f in r.json()["files"]}


def _runtime_or_reason(section: dict, runtime: str, package: str) -> None:
    """Measured in the runtime where this machine has it; else unavailable, naming the package."""
    import importlib.util

    module = "llama_cpp" if runtime == "llama.cpp" else "onnxruntime"
    if importlib.util.find_spec(module) is not None:
        assert section["available"], section
        assert section["runs_as"] == runtime, section
    else:
        assert not section["available"] and package in section["reason"], section


def test_gguf_job_exports_exactly_and_reports_the_runtime(cluster, bpe_llama, tmp_path):
    c = cluster.client()
    m = upload_dir(c, bpe_llama).json()
    spec = {
        "model_id": m["id"],
        "steps": [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}}],
        "evaluation": {"max_samples": 4, "runs": 2, "warmup": 0, "budget_s": 5, "seq_len": 32},
        "output": {"format": "gguf"},
    }
    job = c.post("/v1/jobs", json=spec).json()
    assert job["plan"]["artifact_bytes"] < job["plan"]["model_bytes"], job["plan"]
    assert any("export: GGUF Q4_0" in n for n in job["plan"]["notes"]), job["plan"]["notes"]
    done = wait_job(c, job["id"])
    assert done["status"] == "succeeded", done
    files = _files(c, job["id"], "gguf")
    assert set(files) == {"model-Q4_0.gguf", "modelpress.json"}, files
    export = done["metrics"]["export"]
    assert export["format"] == "gguf" and export["gguf_type"] == "Q4_0" and export["exact"] is True, export
    assert done["metrics"]["stage_seconds"]["export"] > 0
    _runtime_or_reason(done["metrics"]["speed"], "llama.cpp", "llama-cpp-python")
    # Quality and fidelity are measured either way: in llama.cpp, or from the GGUF's own weights
    # through transformers' GGUF loader where llama.cpp is not installed.
    quality, fidelity = done["metrics"]["quality"], done["metrics"]["fidelity"]
    assert quality["available"] and quality["metric"] == "perplexity" and quality["compressed"] > 0, quality
    assert fidelity["available"] and 0 <= fidelity["top1_agreement"] <= 1, fidelity

    # The GGUF alone, by its file route, reads back with the gguf package.
    r = c.get(f"/v1/jobs/{job['id']}/artifact/files/model-Q4_0.gguf")
    assert r.status_code == 200 and len(r.content) == files["model-Q4_0.gguf"]
    path = tmp_path / "model.gguf"
    path.write_bytes(r.content)
    from gguf import GGUFReader

    reader = GGUFReader(path)
    # The blocks' matrices are the job's 4-bit integers; the embeddings and the output head, which
    # quantize.weight_only leaves alone, stay in the model's bfloat16.
    blocks = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2 and t.name.startswith("blk.")}
    others = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2 and not t.name.startswith("blk.")}
    assert blocks == {"Q4_0"} and others == {"BF16"}, (blocks, others)
    report = c.get(f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html"})
    assert report.status_code == 200 and "Export" in report.text and "Q4_0" in report.text


def test_onnx_job_runs_in_onnxruntime(cluster, tiny_tokenized):
    c = cluster.client()
    m = upload_dir(c, tiny_tokenized["gpt2"]).json()
    # No step: the export is the whole job (ONNX Runtime's int8 of the model as it is).
    spec = {
        "model_id": m["id"],
        "steps": [],
        "evaluation": {"max_samples": 4, "runs": 2, "warmup": 0, "budget_s": 5, "seq_len": 16},
        "output": {"format": "onnx", "quantize": "int8_dynamic"},
    }
    assert c.post("/v1/jobs", json={**spec, "output": {"format": "safetensors"}}).status_code == 422
    r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    done = wait_job(c, r.json()["id"])
    assert done["status"] == "succeeded", done
    files = _files(c, done["id"], "onnx")
    assert "model.onnx" in files and "modelpress.json" in files, files
    assert done["metrics"]["export"]["quantize"] == "int8_dynamic"
    assert done["metrics"]["export"]["reduce_range"] is True  # 7-bit weights unless asked otherwise
    _runtime_or_reason(done["metrics"]["speed"], "onnxruntime", "onnxruntime")
    if done["metrics"]["quality"]["available"]:
        # Perplexity from ONNX Runtime's logits of both models, on the same texts.
        q = done["metrics"]["quality"]
        assert q["original"] > 0 and q["compressed"] > 0, q


@pytest.fixture(scope="module")
def tiny_tokenized(tmp_path_factory):
    from tests.tokenizer_util import build_models

    return build_models(tmp_path_factory.mktemp("exports-tok"))


def test_gguf_quality_without_llama_cpp_comes_from_its_weights(bpe_llama, tmp_path):
    """The fallback a worker without llama-cpp-python takes (worker/exporting.py): the GGUF's
    weights through transformers' GGUF loader against the original; no latency claimed."""
    from worker import evaluate, exporting
    from worker.export.gguf import export_gguf

    out = tmp_path / "export"
    out.mkdir()
    export = export_gguf(bpe_llama, out / "model-Q8_0.gguf", "Q8_0")
    settings = {"enabled": True, "batch_size": 1, "seq_len": 32, "runs": 2, "warmup": 0, "max_samples": 4}
    texts = [{"text": t} for t in ("the cat sat on the mat", "a dog ran in the park", "the sun was warm")]
    evaluator = evaluate.Evaluator({**settings, "budget_s": 5.0}, bpe_llama, lambda: (texts, {"source": "test"}))
    sections = exporting.measure_gguf_weights(evaluator, bpe_llama, out, export)
    assert not sections["speed"]["available"] and "llama-cpp-python" in sections["speed"]["reason"]
    q, f = sections["quality"], sections["fidelity"]
    assert q["available"] and "GGUF loader" in q["measured_with"], q
    # Q8_0 of a tiny model: nearly the original's perplexity and the same top-1 token almost always.
    assert abs(q["ratio"] - 1) < 0.05, q
    assert f["available"] and f["top1_agreement"] > 0.9, f


def test_a_failed_export_leaves_nothing_behind(bpe_llama, tmp_path):
    """worker/exporting.export_artifact: a converter that fails raises ExportFailed naming what
    failed, and leaves neither its scratch folders nor a partial zip; the steps' artifact stays
    for the pipeline to drop with the attempt's scratch."""
    import zipfile

    from worker import exporting

    artifact = tmp_path / "model.zip"
    with zipfile.ZipFile(artifact, "w") as zf:
        for p in bpe_llama.iterdir():
            data = p.read_bytes()
            if p.name == "model.safetensors":  # cut mid-tensor: the converter cannot read it
                data = data[: len(data) // 2]
            zf.writestr(p.name, data)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(exporting.ExportFailed) as e:
        exporting.export_artifact(artifact, "hf", tmp_path, {"format": "gguf", "type": "F16"}, [])
    assert str(e.value), "the error says what failed"
    assert {p.name for p in tmp_path.iterdir()} == before, "no scratch folder or partial zip is left"
