"""Reports: the math on hand-computed values, the evaluator on tiny models in-process, and the
numbers a real job reports through the service (JSON, HTML, signed links)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import upload_dir, wait_job
from tests.tokenizer_util import build_models, labeled_jsonl
from worker.ops import metrics as m


# -- math ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_perplexity_matches_a_hand_computed_value_on_a_tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=16)).eval()
    ids = torch.tensor([3, 7, 1, 9, 4, 4, 0])
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
    # By hand: -log softmax(logits[t])[ids[t+1]], averaged over the 6 predicted tokens, exponentiated.
    nlls = []
    for t in range(len(ids) - 1):
        row = [float(x) for x in logits[t]]
        log_z = math.log(sum(math.exp(x) for x in row))
        nlls.append(log_z - row[int(ids[t + 1])])
    by_hand = math.exp(sum(nlls) / len(nlls))
    total, count = m.next_token_nll(logits, ids)
    assert count == 6
    # exp runs in the logits' float32 (sums in float64: worker/ops/metrics.py), so the agreement
    # with the all-float64 hand computation is to float32's exp, not to float64's.
    assert m.perplexity(total, count) == pytest.approx(by_hand, rel=1e-7)
    # The same value transformers' own loss gives (mean CE over shifted labels).
    with torch.no_grad():
        loss = model(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss
    assert m.perplexity(total, count) == pytest.approx(math.exp(float(loss)), rel=1e-5)


@pytest.mark.unit
def test_kl_agreement_and_cosine_on_known_values():
    p = torch.log(torch.tensor([[0.6, 0.4], [0.2, 0.8]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.1, 0.9], [0.2, 0.8]], dtype=torch.float64))
    kl = m.kl_per_position(p, q)
    assert float(kl[0]) == pytest.approx(0.6 * math.log(0.6 / 0.1) + 0.4 * math.log(0.4 / 0.9), rel=1e-9)
    assert float(kl[1]) == pytest.approx(0.0, abs=1e-12)
    assert m.top1_agreement(p, q).tolist() == [0.0, 1.0]
    x = torch.randn(5, 7)
    assert torch.equal(m.kl_per_position(x, x), torch.zeros(5, dtype=torch.float64))
    assert m.top1_agreement(x, x).tolist() == [1.0] * 5
    assert m.cosine_rows(x, x).tolist() == pytest.approx([1.0] * 5, abs=1e-12)
    assert float(m.cosine_rows(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))[0]) == 0.0
    assert m.latency_stats([0.003, 0.001, 0.002])["median_ms"] == 2.0


# -- the evaluator in-process -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("report-models"))


SETTINGS = {"enabled": True, "batch_size": 2, "seq_len": 16, "runs": 3, "warmup": 1, "max_samples": 12}


def _evaluate(src: Path, artifact: Path, texts=None, settings=SETTINGS) -> dict:
    from worker import evaluate, model_io
    from worker.pipeline import _eval_texts  # noqa: F401 - the pipeline's source of texts

    def source():
        if texts is not None:
            return texts, {"source": "eval_dataset", "id": "ds"}
        lines = evaluate.BUILTIN_CORPUS.read_text().splitlines()
        return [{"text": t} for t in lines], {"source": "builtin", "id": None}

    ev = evaluate.Evaluator(settings, src, source)
    ev.measure_original(model_io.load(src, "hf").module)
    ev.measure_compressed(artifact)
    return ev.sections()


@pytest.mark.integration
def test_an_unchanged_model_has_perfect_fidelity(tok_models):
    s = _evaluate(tok_models["gpt2"], tok_models["gpt2"])
    f, q, sp = s["fidelity"], s["quality"], s["speed"]
    assert f["available"] and f["on"] == "logits"
    assert f["kl_mean"] == 0.0 and f["top1_agreement"] == 1.0 and f["output_cosine"] == 1.0
    assert q["metric"] == "perplexity" and q["original"] == q["compressed"] and q["delta"] == 0.0
    assert q["dataset"]["source"] == "builtin" and q["dataset"]["samples"] == 12
    # seq_len 16 is below the model's 64 positions: kept; 2 x 16 tokens per timed pass.
    assert sp["available"] and sp["batch_size"] == 2 and sp["seq_len"] == 16 and len(sp["original"]["samples_ms"]) == 3
    assert sp["runs_as"] == "dense" and sp["original"]["median_ms"] > 0
    assert sp["speedup"] is None and "noise" in sp["note"]  # same shapes, same kernels: nothing to claim


@pytest.mark.integration
def test_a_changed_model_shows_in_fidelity(tok_models, tmp_path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tok_models["gpt2"])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)
    model.save_pretrained(tmp_path)
    f = _evaluate(tok_models["gpt2"], tmp_path)["fidelity"]
    assert f["kl_mean"] > 0 and f["output_cosine"] < 1.0 and 0 <= f["top1_agreement"] <= 1.0


@pytest.mark.integration
def test_classifier_accuracy_needs_labels_and_encoders_report_embedding_cosine(tok_models):
    rows = [json.loads(line) for line in labeled_jsonl().decode().splitlines()]
    # Integer labels: the tiny classifier's config maps LABEL_0/1, not pos/neg.
    texts = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in rows]
    s = _evaluate(tok_models["bert-cls"], tok_models["bert-cls"], texts)
    assert s["quality"]["metric"] == "accuracy" and s["quality"]["labeled_samples"] == 12
    expected = s["quality"]["original"]
    assert 0.0 <= expected <= 1.0 and s["quality"]["compressed"] == expected
    assert s["fidelity"]["kl_mean"] == 0.0 and s["fidelity"]["top1_agreement"] == 1.0

    s = _evaluate(tok_models["bert-cls"], tok_models["bert-cls"])  # no labels
    assert s["quality"] == {"available": False, "reason": pytest.approx(s["quality"]["reason"])}
    assert "labels" in s["quality"]["reason"] and s["fidelity"]["available"]

    s = _evaluate(tok_models["bert-bare"], tok_models["bert-bare"])
    assert s["quality"]["metric"] == "embedding_cosine" and s["quality"]["compressed"] == 1.0
    f = s["fidelity"]
    assert f["on"] == "last_hidden_state" and f["kl_mean"] is None and f["top1_agreement"] is None
    assert "hidden states" in f["reasons"]["kl_mean"] and f["output_cosine"] == 1.0


@pytest.mark.integration
def test_without_a_tokenizer_fidelity_uses_random_ids_and_perplexity_says_why(tiny):
    s = _evaluate(tiny["gpt2"], tiny["gpt2"], settings={**SETTINGS, "seq_len": 100})
    assert s["quality"]["available"] is False and "tokenizer" in s["quality"]["reason"]
    assert s["fidelity"]["inputs"] == "random_token_ids" and s["fidelity"]["kl_mean"] == 0.0
    # The tiny GPT-2 has 64 positions: the report says it cut seq_len.
    assert s["speed"]["seq_len"] == 64 and any("cut" in n for n in s["speed"]["notes"])


# -- through the service ------------------------------------------------------------------------
def _job(c, model_id: str, steps: list, **extra) -> dict:
    r = c.post("/v1/jobs", json={"model_id": model_id, "steps": steps, **extra})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def _report(c, job_id: str) -> dict:
    r = c.get(f"/v1/jobs/{job_id}/report")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


@pytest.mark.integration
def test_pruned_job_reports_sizes_sparsity_speed_quality_fidelity(stack, tok_models):
    c = stack.client()
    model = upload_dir(c, tok_models["gpt2"]).json()
    job = _job(
        c,
        model["id"],
        [{"method": "prune.magnitude", "params": {"sparsity": 0.5, "scope": "layer"}}],
        evaluation={"batch_size": 2, "seq_len": 32, "runs": 3},
    )
    rep = _report(c, job["id"])
    assert rep["job_id"] == job["id"] and rep["status"] == "succeeded" and rep["model_id"] == model["id"]

    sp = rep["sparsity"]
    assert sp["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert sp["per_layer"] and all(layer["sparsity"] == pytest.approx(0.5, abs=0.02) for layer in sp["per_layer"])
    assert sum(layer["zeros"] for layer in sp["per_layer"]) == sp["target_zeros"]
    size = rep["size"]
    assert size["artifact_bytes"] == job["artifact"]["size_bytes"] and size["original_bytes"] == model["size_bytes"]
    assert size["parameters"]["original"] == size["parameters"]["total"] == model["parameters"]
    total, nonzero = size["parameters"]["total"], size["parameters"]["nonzero"]
    # Zeros outside the targets (GPT-2 initialises biases to 0) count in "overall" only.
    assert total - nonzero >= sp["target_zeros"] and sp["overall"] == pytest.approx((total - nonzero) / total, abs=1e-6)
    assert 0 < sp["overall"] < 0.5 and size["mean_bits_per_weight"] == pytest.approx(32.0, abs=0.01)
    assert size["weight_bytes_ratio"] == 1.0  # zeros are stored densely; the zip is what shrinks

    speed = rep["speed"]
    assert speed["available"] and speed["batch_size"] == 2 and speed["seq_len"] == 32 and speed["runs"] == 3
    assert speed["original"]["median_ms"] > 0 and speed["compressed"]["median_ms"] > 0
    assert speed["runs_as"] == "dense" and speed["speedup"] is None and speed["latency_ratio"] > 0
    q = rep["quality"]
    assert (
        q["metric"] == "perplexity"
        and q["dataset"]["source"] == "builtin"
        and q["original"] > 1
        and q["compressed"] > 1
    )
    f = rep["fidelity"]
    assert f["kl_mean"] > 0 and 0 <= f["top1_agreement"] <= 1 and f["output_cosine"] < 1
    assert rep["memory"]["peak_rss_bytes"] > 50 * 2**20
    st = rep["stage_seconds"]
    assert {"evaluate_original", "evaluate_compressed", "store", "total"} <= set(st)
    # In memory (load, the step, save) or streamed (worker/stream: the data-free steps fused in one pass).
    assert {"load", "step1:prune.magnitude", "save"} <= set(st) or "stream" in st
    # The evaluation budget: the default's counts, said in every section it shapes.
    assert speed["runs_requested"] == 3 and q["samples"] == f["samples"] <= q["samples_requested"] == 32
    assert q["budget"]["budget_s"] == 15.0 and q["ci95"]["original"][0] < q["original"] < q["ci95"]["original"][1]


@pytest.mark.integration
def test_float16_cast_halves_the_weight_bytes(stack, tok_models):
    c = stack.client()
    model = upload_dir(c, tok_models["llama"]).json()
    job = _job(c, model["id"], [{"method": "quantize.cast", "params": {"dtype": "float16"}}])
    rep = _report(c, job["id"])
    size = rep["size"]
    # Other dtypes run other kernels: the measured ratio is claimed, whichever way it goes.
    # (Both are rounded to 4 decimals: a float16 model ~100x slower on a loaded CPU has a speedup
    # of 0.0103 against 1 / 97.42 = 0.010265, hence the absolute tolerance too.)
    assert rep["speed"]["runs_as"] == "dense" and rep["speed"]["speedup"] == pytest.approx(
        1 / rep["speed"]["latency_ratio"], rel=1e-3, abs=1e-4
    )
    assert size["artifact_weight_bytes"] * 2 == size["original_weight_bytes"]
    assert size["weight_bytes_ratio"] == 0.5 and size["mean_bits_per_weight"] == 16.0


@pytest.mark.integration
def test_an_identity_job_is_perfectly_faithful(embedded, tok_models):
    c = embedded.client()
    model = upload_dir(c, tok_models["llama"]).json()
    # A threshold below every weight's magnitude zeroes nothing: the artifact equals the upload.
    job = _job(c, model["id"], [{"method": "prune.magnitude", "params": {"threshold": 1e-30}}])
    rep = _report(c, job["id"])
    assert rep["sparsity"]["target_zeros"] == 0
    f, q = rep["fidelity"], rep["quality"]
    assert f["kl_mean"] == 0.0 and f["top1_agreement"] == 1.0 and f["output_cosine"] == 1.0
    assert q["original"] == q["compressed"]


@pytest.mark.integration
def test_int8_kernels_are_claimed_only_where_they_run(embedded, tok_models):
    c = embedded.client()
    model = upload_dir(c, tok_models["llama"]).json()
    w8a8 = _report(c, _job(c, model["id"], [{"method": "quantize.dynamic_int8", "params": {}}])["id"])["speed"]
    assert w8a8["runs_as"] == "int8_kernels" and w8a8["speedup"] is not None
    assert w8a8["decompressed"]["median_ms"] > 0 and "int8" in w8a8["kernel"]
    wo = _report(c, _job(c, model["id"], [{"method": "quantize.weight_only", "params": {"bits": 8}}])["id"])
    assert wo["speed"]["runs_as"] == "decompressed" and wo["speed"]["speedup"] is None
    assert "no speed-up is claimed" in wo["speed"]["note"] and wo["speed"]["latency_ratio"] > 0
    assert wo["fidelity"]["kl_mean"] > 0 and wo["size"]["mean_bits_per_weight"] < 32


@pytest.mark.integration
def test_what_cannot_be_measured_says_why(embedded, tiny, tok_models):
    c = embedded.client()
    bare = c.post("/v1/models", files=[("files", ("w.safetensors", tiny["bare"].read_bytes()))]).json()
    rep = _report(c, _job(c, bare["id"], [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}])["id"])
    for section in ("speed", "quality", "fidelity"):
        assert rep[section]["available"] is False and "bare safetensors" in rep[section]["reason"]
    assert rep["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.005)

    model = upload_dir(c, tok_models["gpt2"]).json()
    off = _report(
        c,
        _job(
            c, model["id"], [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}], evaluation={"enabled": False}
        )["id"],
    )
    assert off["quality"]["available"] is False and "enabled" in off["quality"]["reason"]

    r = c.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
            "evaluation": {"seq_len": 2},
        },
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][:3] == ["body", "evaluation", "seq_len"]


@pytest.mark.integration
def test_classifier_accuracy_through_the_service(embedded, tok_models):
    c = embedded.client()
    rows = [json.loads(line) for line in labeled_jsonl().decode().splitlines()]
    data = "".join(json.dumps({"text": r["text"], "label": int(r["label"] == "pos")}) + "\n" for r in rows).encode()
    ds = c.post("/v1/datasets", files={"file": ("eval.jsonl", data)}).json()
    model = upload_dir(c, tok_models["bert-cls"]).json()
    job = _job(c, model["id"], [{"method": "prune.magnitude", "params": {"sparsity": 0.3}}], eval_dataset_id=ds["id"])
    q = _report(c, job["id"])["quality"]
    assert q["metric"] == "accuracy" and q["dataset"] == {
        "source": "eval_dataset",
        "id": ds["id"],
        "samples": len(rows),
        "tokens": q["dataset"]["tokens"],
    }
    assert q["labeled_samples"] == len(rows) and 0 <= q["compressed"] <= 1


@pytest.mark.e2e
def test_report_html_and_signed_link(embedded, tok_models):
    import httpx

    from tests.browser import open_in_chromium

    c = embedded.client()
    model = upload_dir(c, tok_models["gpt2"]).json()
    job = _job(
        c, model["id"], [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}], name="<script>alert(1)</script>"
    )
    r = c.get(f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "<script>alert(1)</script>" not in r.text and "&lt;script&gt;" in r.text

    other = embedded.service.client(embedded.other_key)
    assert other.get(f"/v1/jobs/{job['id']}/report").status_code == 404
    assert other.post(f"/v1/jobs/{job['id']}/report/link").status_code == 404

    link = c.post(f"/v1/jobs/{job['id']}/report/link", json={"ttl_s": 120})
    assert link.status_code == 201, link.text
    url = link.json()["url"]
    assert httpx.get(url).status_code == 200  # no Authorization header
    assert httpx.get(url.replace("signature=", "signature=0")).status_code == 404
    page = open_in_chromium(url)
    assert page["status"] == 200 and page["console_errors"] == [] and page["page_errors"] == []
    assert page["failed_requests"] == [] and page["bad_responses"] == []
    assert page["svg_count"] >= 4  # size, latency, quality, per-layer sparsity
    assert "perplexity" in page["text"].lower()


@pytest.mark.integration
def test_report_of_an_unfinished_job_is_409(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    model = upload_dir(c, tiny["gpt2"]).json()
    job = c.post(
        "/v1/jobs",
        json={"model_id": model["id"], "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]},
    ).json()
    r = c.get(f"/v1/jobs/{job['id']}/report")
    assert r.status_code == 409 and r.json()["code"] == "report_not_ready"
    assert c.post(f"/v1/jobs/{job['id']}/report/link").status_code == 409
