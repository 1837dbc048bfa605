"""transform.rotate (issue 22 item 2): refusals at submit (alone, before the wrong step, on an
architecture or width it cannot rotate, before an export that cannot express it); SpinQuant's
fused rotations keep the model's function and leave an ordinary artifact; QuIP's online rotations
are recorded in the artifact and re-attached for evaluation; both make 4-bit round-to-nearest lose
less on a model with outlier channels; a whole rotate + GPTQ job through the embedded service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core import exports
from core.methods import ModelInfo, StepError, validate_steps
from core.methods import transform_rotate as rot

LLAMA = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 6}
TOK = ("config.json", "model.safetensors", "tokenizer.json")
W4 = {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}}


def _refused(steps: list[dict], info: ModelInfo | None = None) -> dict:
    with pytest.raises(StepError) as e:
        validate_steps(steps, info)
    return e.value.errors[0]


@pytest.mark.unit
def test_a_rotation_must_be_followed_by_a_quantizer() -> None:
    err = _refused([{"method": "transform.rotate"}])
    assert err["type"] == "step_order" and err["constraint"] == "followed_by" and "nothing follows it" in err["msg"]
    err = _refused([{"method": "transform.rotate"}, {"method": "prune.magnitude", "params": {"sparsity": 0.5}}])
    assert "'prune.magnitude' follows it" in err["msg"] and err["loc"] == ["body", "steps", 0, "method"]
    steps = validate_steps([{"method": "transform.rotate"}, W4])
    assert steps[0]["params"] == {
        "style": "spinquant",
        "transform_type": "random-hadamard",
        "block_size": None,
        "ignore": ["lm_head"],
    }


@pytest.mark.unit
def test_spinquant_is_refused_where_its_fused_rotations_would_change_the_model() -> None:
    gemma = ModelInfo("hf", "Gemma3ForCausalLM", {"model_type": "gemma3_text", "hidden_size": 640}, TOK)
    err = _refused([{"method": "transform.rotate", "params": {"style": "spinquant"}}, W4], gemma)
    assert err["constraint"] == "architectures" and "Use style quip" in err["msg"]
    assert validate_steps([{"method": "transform.rotate", "params": {"style": "quip"}}, W4], gemma)
    gpt2 = ModelInfo("hf", "GPT2LMHeadModel", {"model_type": "gpt2"}, TOK)
    assert _refused([{"method": "transform.rotate", "params": {"style": "quip"}}, W4], gpt2)["constraint"] == (
        "linear_layers_only"
    )


@pytest.mark.unit
def test_widths_no_matrix_exists_for_are_refused() -> None:
    llama = ModelInfo("hf", "LlamaForCausalLM", LLAMA, TOK)
    err = _refused([{"method": "transform.rotate", "params": {"transform_type": "hadamard"}}, W4], llama)
    assert err["constraint"] == "hadamard_widths" and "width 96" in err["msg"]
    err = _refused([{"method": "transform.rotate", "params": {"block_size": 64}}, W4], llama)
    assert err["loc"][-1] == "block_size" and "does not divide" in err["msg"]
    assert validate_steps([{"method": "transform.rotate", "params": {"block_size": 16}}, W4], llama)
    assert rot.supported_width(576, "random-hadamard") and rot.supported_width(640, "random-hadamard")
    assert not rot.supported_width(576, "hadamard") and not rot.supported_width(1040, "random-hadamard")
    assert not rot.supported_width(6, "random-hadamard") and rot.supported_width(6, "random-matrix")


@pytest.mark.unit
def test_known_hadamard_orders_are_compressed_tensors_own() -> None:
    import compressed_tensors.transform.utils.hadamard as h
    from safetensors import safe_open

    with safe_open(str(h.REPO_PATH), framework="pt") as f:
        assert {int(k) for k in f.keys()} == rot.KNOWN_HADAMARD_ORDERS  # noqa: SIM118 - safe_open is no dict


@pytest.mark.unit
def test_online_rotations_cannot_be_exported() -> None:
    llama = ModelInfo("hf", "LlamaForCausalLM", LLAMA, TOK)
    quip = validate_steps([{"method": "transform.rotate", "params": {"style": "quip"}}, W4], llama)
    for fmt in ("gguf", "onnx"):
        reasons = exports.refusals({"format": fmt}, llama, quip, has_dataset=False)
        assert reasons and "cannot express" in reasons[0], reasons
    spin = validate_steps([{"method": "transform.rotate"}, W4], llama)
    assert not any("transform_config" in r for r in exports.refusals({"format": "gguf"}, llama, spin, False))


def _outlier_llama(path: Path, tied: bool) -> Path:
    """A tiny Llama whose residual stream has a few large channels (as trained LLMs do): the
    outliers that rotations exist to spread."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=96,
            intermediate_size=192,
            num_attention_heads=6,
            num_key_value_heads=3,
            vocab_size=200,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
        )
    )
    with torch.no_grad():
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[:, [3, 40, 77]] *= 25.0
    m.save_pretrained(path)
    return path


def _run(src: Path, steps: list[tuple[str, dict]], out: Path) -> tuple[list[dict], torch.Tensor]:
    from worker import methods, model_io

    loaded = model_io.load(src, "hf")
    metrics = []
    for name, params in steps:
        spec = methods.get(name)
        metrics.append(spec.handler(loaded, spec.params.model_validate(params), None))
    with torch.no_grad():
        logits = loaded.module(IDS).logits
    model_io.save(loaded, out, {"modelpress_manifest": 1})
    return metrics, logits


IDS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(d: Path, online: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from worker.ct_format import attach_online_transforms

    m = AutoModelForCausalLM.from_pretrained(d).eval()
    if online:
        assert attach_online_transforms(m, d) > 0
    with torch.no_grad():
        return m(IDS).logits


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def rotate_step(style: str) -> tuple[str, dict]:
    return ("transform.rotate", {"style": style})


def _weight_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _planned_weight_bytes(src: Path, steps: list[tuple[str, dict]]) -> int:
    """The plan's artifact bytes less what is not a weight file (the other files, zip overhead),
    from the safetensors headers alone, as the API plans a job."""
    from core.jobs import plan

    with (src / "model.safetensors").open("rb") as f:
        tensors = plan.read_header(f, 1 << 24)
    other = sum(p.stat().st_size for p in src.iterdir() if p.suffix != ".safetensors")
    out = plan.compute(
        fmt="hf",
        tensors=tensors,
        other_bytes=other,
        input_bytes=other + _weight_bytes(src),
        steps=[{"method": m, "params": p} for m, p in steps],
        evaluation={"enabled": False},
        stream=False,
        input_on_scratch=False,
    )
    # Each safetensors file also has its header (names, shapes, offsets): a few KB here.
    return out["artifact_bytes"] - other - plan.ZIP_OVERHEAD_BYTES


@pytest.mark.integration
@pytest.mark.parametrize("style", ["spinquant", "quip"])
def test_rotations_keep_the_function_and_make_4bit_rtn_lose_less(tmp_path: Path, style: str) -> None:
    src = _outlier_llama(tmp_path / "src", tied=style == "spinquant")
    ref = _logits(src)
    w4 = ("quantize.weight_only", {"bits": 4, "group_size": 32})
    (rotate_m, w4_m), rotated = _run(src, [rotate_step(style), w4], tmp_path / "rot")
    _, plain = _run(src, [w4], tmp_path / "plain")
    # The rotation alone computes the original's function (float32: rounding only).
    assert rotate_m["logits_max_rel_diff"] < 1e-5 and rotate_m["style"] == style
    # ...and the quantizer after it loses less than on the unrotated model.
    assert _err(rotated, ref) < 0.7 * _err(plain, ref), (_err(rotated, ref), _err(plain, ref))
    # The plan's artifact (from the input's headers) counts what the rotation adds: the untied
    # head (spinquant) or the stored Hadamard matrices (quip).
    assert _planned_weight_bytes(src, [rotate_step(style), w4]) == pytest.approx(
        _weight_bytes(tmp_path / "rot"), rel=0.02
    )
    qc = json.loads((tmp_path / "rot" / "config.json").read_text())["quantization_config"]
    if style == "spinquant":
        # An ordinary model: nothing to run online, transformers alone reproduces it exactly.
        assert not qc.get("transform_config") and rotate_m["online_layers"] == 0 and rotate_m["untied_embeddings"]
        assert torch.equal(_logits(tmp_path / "rot"), rotated)
    else:
        online = [a for g in qc["transform_config"]["config_groups"].values() for a in g["apply"]]
        assert {a["location"] for a in online} == {"input", "weight_input"} and rotate_m["online_layers"] == 14
        # transformers alone skips the online rotations (wrong outputs); re-attached, it is exact.
        assert _err(_logits(tmp_path / "rot"), rotated) > 0.1
        assert torch.equal(_logits(tmp_path / "rot", online=True), rotated)
        # The stored matrices are the model's dtype (compressed-tensors computes them in float64;
        # their +-1 entries are exact in any float type), and the model in memory kept float64.
        from safetensors import safe_open

        with safe_open(str(tmp_path / "rot" / "model.safetensors"), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys() if k.endswith("_input.weight")}  # noqa: SIM118
        assert stored and {t.dtype for t in stored.values()} == {torch.float32}, {k: t.dtype for k, t in stored.items()}
        assert all(bool((t.abs() == 1).all()) for t in stored.values())


@pytest.mark.integration
@pytest.mark.slow
def test_rotate_then_gptq_job_through_the_service(embedded, tmp_path: Path) -> None:
    from tests.helpers import upload_dir, wait_job
    from tests.tokenizer_util import build_models, txt_dataset

    models = build_models(tmp_path / "models")
    c = embedded.client()
    model_id = upload_dir(c, models["llama"]).json()["id"]
    data = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())}).json()["id"]
    steps = [
        {"method": "transform.rotate", "params": {"style": "quip"}},
        {"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 32}},
    ]
    evaluation = {"runs": 1, "warmup": 0, "max_samples": 4, "seq_len": 32, "budget_s": 600}
    r = c.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "dataset_id": data, "evaluation": evaluation})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    rotate_m, gptq_m = job["metrics"]["steps"]
    assert rotate_m["online_layers"] > 0 and gptq_m["calibration_samples"] > 0
    report = c.get(f"/v1/jobs/{job['id']}/report").json()
    notes = " ".join(report["speed"].get("notes") or [])
    assert "online Hadamard rotations" in notes, report["speed"]
    assert report["fidelity"]["kl_mean"] is not None
