"""Artifact bytes (the zip the artifact route serves) relative to the uploaded model, on a tiny
Llama whose Linear weights dominate (hidden 256, intermediate 1024, 2 layers, vocab 128, tied
embeddings: 2.10M of 2.13M parameters are Linear weights), through the real cluster service."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from tests.helpers import upload_dir, wait_job

pytestmark = pytest.mark.integration

# (step, largest accepted artifact / upload ratio, lowest accepted per-token cosine of the
# artifact's logits to the original's, loaded with plain transformers; None: printed only).
# Measured: ratios 0.2467, 0.1297, 1.0000 (0.5397 when weights were deflated), 0.2466, 0.1221;
# cosines 0.99976, 0.9540, (0.788), 0.99958, (0.441, with 43.5% of the weights clipped).
LIMITS = [
    ({"method": "quantize.weight_only", "params": {"bits": 8}}, 0.30, 0.999),
    ({"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}, 0.20, 0.94),
    # Weight files are stored, not deflated (issue 14: deflating multi-GB weights cost more than
    # the method): a dense pruned model keeps its size, and the zip adds only its directory.
    ({"method": "prune.magnitude", "params": {"sparsity": 0.5}}, 1.001, None),
    # Not in the acceptance list; bounded by what their bits allow.
    ({"method": "quantize.dynamic_int8", "params": {}}, 0.30, 0.999),
    # 4 bits with 9 fractional bits: the range is +-1/64, under one standard deviation of these
    # weights, so most are clipped (the clipped fraction is reported): size only.
    ({"method": "quantize.fixed_point", "params": {"frac_bits": 9, "bits": 4}}, 0.20, None),
]


@pytest.fixture(scope="module")
def linear_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=256,
            intermediate_size=1024,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    assert linear / sum(p.numel() for p in model.parameters()) > 0.98
    out = tmp_path_factory.mktemp("linear-llama")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def uploaded(cluster, linear_llama) -> dict:
    r = upload_dir(cluster.client(), linear_llama)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize(
    ("step", "limit", "min_cos"), LIMITS, ids=[f"{s['method']}-{s['params']}" for s, _, _ in LIMITS]
)
def test_artifact_ratio(cluster, uploaded, linear_llama, tmp_path, step, limit, min_cos):
    c = cluster.client()
    job = wait_job(c, c.post("/v1/jobs", json={"model_id": uploaded["id"], "steps": [step]}).json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    served = c.get(f"/v1/jobs/{job['id']}/artifact").content
    assert len(served) == job["artifact"]["size_bytes"] == job["metrics"]["size"]["artifact_bytes"]
    ratio = len(served) / uploaded["size_bytes"]

    # The tied-embedding model loads with plain transformers and still computes nearly the same.
    import torch
    from transformers import AutoModelForCausalLM

    with zipfile.ZipFile(io.BytesIO(served)) as zf:
        zf.extractall(tmp_path / "art")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(linear_llama).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "art").eval()(ids).logits
    cos = float(torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1).min())
    extra = job["metrics"]["steps"][0].get("clipped_fraction")
    print(
        f"\n{step['method']} {step['params']}: artifact {len(served)} B / upload {uploaded['size_bytes']} B "
        f"= {ratio:.4f}; "
        f"min token cosine {cos:.5f}" + (f"; clipped fraction {extra:.4f}" if extra is not None else "")
    )
    assert ratio <= limit
    if min_cos is not None:
        assert cos >= min_cos
