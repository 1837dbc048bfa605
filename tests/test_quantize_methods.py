"""quantize.dynamic_int8 / weight_only / fixed_point through the real service (cluster: Postgres,
Redis, a Celery worker; embedded: SQLite and the API's worker): upload, submit, poll, download
the zip, load it with plain transformers (compressed-tensors installed, no modelpress code), and
compare with the original model, weight by weight and on outputs. Refusals at submit (GPT-2,
bare state dicts, group sizes, step order, already-quantized uploads) are checked too."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import upload_dir, wait_job

# (model, step, expected scheme/format facts, min per-token cosine to the original outputs,
#  isolated: also load in a fresh interpreter that never imports modelpress).
# Thresholds were set from measurements on these tiny random models (same seed every run), on the
# Llama logits: int8 (W8A8 and W8A16) 0.99991, 4-bit groups of 32 0.9884, asymmetric groups of 64
# 0.9909, fixed point 6 bits / 9 fractional 0.9987. The random BERT's outputs are dominated by
# its embeddings and LayerNorms (>= 0.99998 for all), so the weight-by-weight checks carry it.
CASES = [
    (
        "bert",
        {"method": "quantize.dynamic_int8", "params": {}},
        {"format": "int-quantized", "bits": 8, "strategy": "channel", "act": "token"},
        0.999,
        False,
    ),
    (
        "llama",
        {"method": "quantize.dynamic_int8", "params": {}},
        {"format": "int-quantized", "bits": 8, "strategy": "channel", "act": "token"},
        0.999,
        True,
    ),
    (
        "bert",
        {"method": "quantize.weight_only", "params": {"bits": 8}},
        {"format": "pack-quantized", "bits": 8, "strategy": "channel"},
        0.999,
        False,
    ),
    (
        "llama",
        {"method": "quantize.weight_only", "params": {"bits": 8}},
        {"format": "pack-quantized", "bits": 8, "strategy": "channel"},
        0.999,
        False,
    ),
    (
        "bert",
        {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}},
        {"format": "pack-quantized", "bits": 4, "strategy": "group", "group_size": 32},
        0.97,
        False,
    ),
    (
        "llama",
        {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}},
        {"format": "pack-quantized", "bits": 4, "strategy": "group", "group_size": 32},
        0.97,
        True,
    ),
    (
        "llama",
        {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 64, "symmetric": False}},
        {"format": "pack-quantized", "bits": 4, "strategy": "group", "group_size": 64, "symmetric": False},
        0.97,
        False,
    ),
    (
        "bert",
        {"method": "quantize.fixed_point", "params": {"frac_bits": 7}},
        {"format": "pack-quantized", "bits": 8, "strategy": "channel", "frac_bits": 7},
        0.97,
        False,
    ),
    # in 6 bits: the range is +-0.0625, about 3 standard deviations of these weights, so
    # some are clipped.
    (
        "llama",
        {"method": "quantize.fixed_point", "params": {"frac_bits": 9, "bits": 6}},
        {"format": "pack-quantized", "bits": 6, "strategy": "channel", "frac_bits": 9, "clips": True},
        0.99,
        False,
    ),
]

ISOLATED = r"""
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM
d, kind, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cls = AutoModelForCausalLM if kind == "llama" else AutoModel
m = cls.from_pretrained(d).eval()
with torch.no_grad():
    out = m(torch.tensor(ids))[0]
save_file({"out": out.contiguous()}, sys.argv[4])
ours = ("app", "core", "worker", "modelpress")
print(json.dumps({"modelpress_imported": any(k.split(".")[0] in ours for k in sys.modules)}))
"""


def _ids() -> torch.Tensor:
    return torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(7))


def _plain(path: Path, kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if kind == "llama" else AutoModel
    return cls.from_pretrained(path).eval()


def _token_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def _unzip(data: bytes, dest: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        assert {"config.json", "model.safetensors", "modelpress.json"} <= names, names
        zf.extractall(dest)
    return dest


def _linear_targets(model) -> dict[str, torch.nn.Linear]:
    """The layers the methods quantize: every Linear but the output embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kind", "step", "expect", "min_cos", "isolated"),
    CASES,
    ids=[f"{c[0]}-{c[1]['method']}-{json.dumps(c[1]['params'], sort_keys=True)}" for c in CASES],
)
def test_quantize_round_trip(stack, tiny, tmp_path, kind, step, expect, min_cos, isolated):
    from safetensors import safe_open

    c = stack.client()
    m = upload_dir(c, tiny[kind]).json()
    r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": [step]})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=240)
    assert job["status"] == "succeeded", job
    dl = c.get(f"/v1/jobs/{job['id']}/artifact")
    assert dl.status_code == 200 and len(dl.content) == job["artifact"]["size_bytes"]
    out = _unzip(dl.content, tmp_path / "art")

    # --- config.json: a compressed-tensors checkpoint with the requested scheme.
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == expect["format"]
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    wq = group["weights"]
    assert wq["num_bits"] == expect["bits"] and wq["type"] == "int" and wq["strategy"] == expect["strategy"]
    assert wq["group_size"] == expect.get("group_size") and wq["symmetric"] == expect.get("symmetric", True)
    assert wq["dynamic"] is False
    if "act" in expect:
        ia = group["input_activations"]
        assert ia["num_bits"] == 8 and ia["strategy"] == "token" and ia["dynamic"] is True and ia["symmetric"] is True
    else:
        assert group["input_activations"] is None
    assert qc["ignore"] == (["lm_head"] if kind == "llama" else [])

    # --- the step's metrics.
    (sm,) = job["metrics"]["steps"]
    original = _plain(tiny[kind], kind)
    targets = _linear_targets(original)
    assert sm["bits"] == expect["bits"] and sm["group_size"] == expect.get("group_size")
    assert sm["strategy"] == expect["strategy"] and sm["format"] == expect["format"]
    assert sm["layers_quantized"] == len(targets) == (13 if kind == "bert" else 14)
    assert sm["quantized_parameters"] == sum(t.weight.numel() for t in targets.values())
    assert sm["runs"] == "decompressed" and sm["scheme"]
    assert sm["activations"] == ("int8 dynamic per-token" if "act" in expect else None)

    # --- the safetensors hold integers, not floats, for every quantized layer.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        scales = {n: f.get_tensor(f"{n}.weight_scale") for n in targets}
        zps = {n: f.get_tensor(f"{n}.weight_zero_point") for n in targets if f"{n}.weight_zero_point" in keys}
        for n, lin in targets.items():
            if expect["format"] == "int-quantized":
                assert f.get_slice(f"{n}.weight").get_dtype() == "I8"
            else:
                assert f"{n}.weight" not in keys
                packed = f.get_slice(f"{n}.weight_packed")
                assert packed.get_dtype() == "I32"
                assert packed.get_shape() == [lin.out_features, math.ceil(lin.in_features * expect["bits"] / 32)]
                assert f.get_tensor(f"{n}.weight_shape").tolist() == [lin.out_features, lin.in_features]
            groups = 1 if expect["strategy"] == "channel" else lin.in_features // expect["group_size"]
            assert list(scales[n].shape) == [lin.out_features, groups]
        assert bool(zps) == (not expect.get("symmetric", True))
        if kind == "llama":
            assert f.get_slice("lm_head.weight").get_dtype() == "F32"
        emb = next(
            k for k in keys if k.endswith("embeddings.word_embeddings.weight") or k.endswith("embed_tokens.weight")
        )
        assert f.get_slice(emb).get_dtype() == "F32"
    if "frac_bits" in expect:
        # Fixed point: every scale is exactly 2^-n, no zero point.
        assert all(bool((s == 2.0 ** -expect["frac_bits"]).all()) for s in scales.values())
        assert sm["frac_bits"] == expect["frac_bits"] and sm["scale"] == 2.0 ** -expect["frac_bits"]
        assert (sm["clipped_fraction"] > 0) == expect.get("clips", False)

    # --- plain transformers loads it; outputs stay close to the original's.
    ids = _ids()
    with torch.no_grad():
        ref = original(ids)[0]
    loaded = _plain(out, kind)
    with torch.no_grad():
        got = loaded(ids)[0]  # the first forward decompresses
    cos = _token_cos(ref, got)
    # The pipeline surfaces LoadedModel.notes (and a memory figure) where it does: they must
    # describe this artifact as plain transformers runs it.
    notes = job["metrics"].get("notes")
    if notes is not None:
        assert notes["runs"] == "decompressed" and notes["memory_bytes"] == _tally(loaded)
    if "memory_bytes" in job["metrics"]["size"]:
        assert job["metrics"]["size"]["memory_bytes"] == _tally(loaded)
    print(
        f"\n{kind} {step['method']} {step['params']}: min token cosine {cos:.6f}, "
        f"weight rel. RMS error {sm['relative_rms_error']:.5f}, artifact {job['artifact']['size_bytes']} B "
        f"/ upload {m['size_bytes']} B; memory {(notes or {}).get('memory_bytes')} B decompressed, "
        f"{(notes or {}).get('memory_bytes_compressed')} B compressed"
    )
    assert cos >= min_cos
    assert not torch.equal(ref, got), "outputs identical: nothing was quantized"

    # --- weight by weight: the loaded weights are the original's, rounded to the stored grid.
    got_mods = dict(loaded.named_modules())
    sq_err = sq_w = 0.0
    clipped = total = 0
    for n, lin in targets.items():
        w = lin.weight.detach().double()
        w2 = got_mods[n].weight.detach().double()
        s = scales[n].double()
        per_w = s.repeat_interleave(w.shape[1] // s.shape[1], dim=1)
        err = (w - w2).abs()
        if "frac_bits" in expect:
            k = 2.0 ** expect["frac_bits"]
            lo, hi = -(2 ** (expect["bits"] - 1)), 2 ** (expect["bits"] - 1) - 1
            r = torch.round(w.float() * k)
            assert torch.equal(w2.float(), torch.clamp(r, lo, hi) / k)  # the study's formula, clipped
            clipped += int(((r < lo) | (r > hi)).sum())
            total += r.numel()
        else:
            assert bool((err <= per_w / 2 + w.abs() * 2.0**-21).all()), (n, float((err / per_w).max()))
        sq_err += float(err.square().sum())
        sq_w += float(w.square().sum())
    # The reported error describes the artifact.
    assert sm["relative_rms_error"] == pytest.approx((sq_err / sq_w) ** 0.5, rel=1e-3)
    if "frac_bits" in expect:
        assert sm["clipped"] == clipped and sm["clipped_fraction"] == pytest.approx(clipped / total)
    # Embeddings and the LM head are untouched.
    assert torch.equal(loaded.get_input_embeddings().weight, original.get_input_embeddings().weight)
    if kind == "llama":
        assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)

    if isolated and stack.mode == "cluster":
        res = subprocess.run(
            [sys.executable, "-c", ISOLATED, str(out), kind, json.dumps(ids.tolist()), str(tmp_path / "o.safetensors")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1]) == {"modelpress_imported": False}
        from safetensors.torch import load_file

        assert torch.allclose(load_file(str(tmp_path / "o.safetensors"))["out"], got, atol=1e-5)


@pytest.mark.integration
def test_prune_then_quantize(cluster, tiny, tmp_path):
    """A pruning step may come first: its zeros survive int8 (0 quantizes to 0)."""
    c = cluster.client()
    m = upload_dir(c, tiny["llama"]).json()
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={
                "model_id": m["id"],
                "steps": [
                    {"method": "prune.magnitude", "params": {"sparsity": 0.5}},
                    {"method": "quantize.weight_only", "params": {"bits": 8}},
                ],
            },
        ).json()["id"],
        timeout=240,
    )
    assert job["status"] == "succeeded", job
    assert job["metrics"]["sparsity"]["sparsity"] >= 0.5
    loaded = _plain(_unzip(c.get(f"/v1/jobs/{job['id']}/artifact").content, tmp_path / "a"), "llama")
    with torch.no_grad():
        loaded(_ids())
    ws = [m.weight for m in _linear_targets(loaded).values()]
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert zeros >= 0.5


STEPS = [
    {"method": "quantize.dynamic_int8", "params": {}},
    {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}},
    {"method": "quantize.fixed_point", "params": {"frac_bits": 6}},
]


@pytest.mark.integration
@pytest.mark.parametrize("step", STEPS, ids=[s["method"] for s in STEPS])
def test_refusals_at_submit(cluster, tiny, tmp_path, step):
    c = cluster.client()
    # GPT-2: its projections are Conv1D, which compressed-tensors cannot quantize: 422, saying why.
    gpt2 = upload_dir(c, tiny["gpt2"]).json()
    r = c.post("/v1/jobs", json={"model_id": gpt2["id"], "steps": [step]})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["errors"][0]["loc"] == ["body", "steps", 0, "params"]
    assert "Conv1D" in body["errors"][0]["msg"] and "torch.nn.Linear" in body["errors"][0]["msg"]
    # A bare state dict has no config.json, so no compressed-tensors checkpoint.
    bare = tiny["bare"]
    b = c.post("/v1/models", files=[("files", (bare.name, bare.read_bytes()))]).json()
    r = c.post("/v1/jobs", json={"model_id": b["id"], "steps": [step]})
    assert r.status_code == 422 and "does not support 'safetensors'" in r.json()["errors"][0]["msg"]
    # Nothing may follow a quantize step.
    llama = upload_dir(c, tiny["llama"]).json()
    r = c.post(
        "/v1/jobs",
        json={"model_id": llama["id"], "steps": [step, {"method": "prune.magnitude", "params": {"sparsity": 0.1}}]},
    )
    assert r.status_code == 422 and r.json()["errors"][0]["type"] == "step_order"


@pytest.mark.integration
def test_group_size_and_requantize_refused(cluster, tiny, tmp_path):
    c = cluster.client()
    llama = upload_dir(c, tiny["llama"]).json()
    # hidden_size 64 is not a multiple of 128.
    r = c.post(
        "/v1/jobs",
        json={
            "model_id": llama["id"],
            "steps": [
                {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128, "strict_group_size": True}}
            ],
        },
    )
    assert r.status_code == 422 and "group_size 128 does not divide" in r.json()["errors"][0]["msg"]
    # The refusal says which limit, and the group sizes that would work (docs/METHODS.md).
    err = r.json()["errors"][0]
    assert err["constraint"] == "group_divides_inputs" and err["valid_group_sizes"] == [32, 64], err
    assert err["blocking_count"] == 12, err  # 2 layers x 6 projections of the tiny Llama, from the headers
    # An artifact uploaded again is already quantized.
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={"model_id": llama["id"], "steps": [{"method": "quantize.weight_only", "params": {"bits": 8}}]},
        ).json()["id"],
        timeout=240,
    )
    assert job["status"] == "succeeded", job
    art = _unzip(c.get(f"/v1/jobs/{job['id']}/artifact").content, tmp_path / "a")
    up = upload_dir(c, art)
    assert up.status_code == 201, up.text
    r = c.post(
        "/v1/jobs", json={"model_id": up.json()["id"], "steps": [{"method": "quantize.dynamic_int8", "params": {}}]}
    )
    assert r.status_code == 422 and "already quantized" in r.json()["errors"][0]["msg"]


def _tally(model) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.integration
@pytest.mark.parametrize(
    "step",
    [
        {"method": "quantize.dynamic_int8", "params": {}},
        {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32, "symmetric": False}},
        {"method": "quantize.weight_only", "params": {"bits": 8}},
        {"method": "quantize.fixed_point", "params": {"frac_bits": 5, "bits": 3}},
    ],
    ids=lambda s: f"{s['method']}-{s['params']}",
)
def test_memory_notes_match_the_reloaded_model(tiny, tmp_path, step):
    """In-process (handler + saver, no service): the memory figures the method reports are what
    plain transformers holds, before the first forward (compressed) and after (decompressed)."""
    from worker import methods, model_io

    spec = methods.get(step["method"])
    loaded = model_io.load(tiny["llama"], "hf")
    spec.handler(loaded, spec.params.model_validate(step["params"]), None)
    assert loaded.notes["runs"] == "decompressed" and loaded.notes["ignored_layers"] == ["lm_head"]
    model_io.save(loaded, tmp_path / "out", {"modelpress_manifest": 1})
    # The saver leaves the in-memory model usable: float weights again (the quantized values).
    assert all(t.weight.is_floating_point() for t in loaded.targets())
    model = _plain(tmp_path / "out", "llama")
    assert _tally(model) == loaded.notes["memory_bytes_compressed"]
    with torch.no_grad():
        model(_ids())
    assert _tally(model) == loaded.notes["memory_bytes"]
    assert loaded.notes["memory_bytes_compressed"] < loaded.notes["memory_bytes"]
