"""quantize.autoround (issue 22 item 3): parameters and submit-time refusals (no dataset, GPT-2's
Conv1D, a scheme it does not have...); on a tiny Llama, a whole job through the embedded service
(a CPU worker) whose artifact loads in plain transformers with compressed-tensors and stays close to
the original; in-process, W8A16 per channel, the layers AutoRound keeps in float listed, and the
block path's artifact equal to the in-memory one. Tiny ``iters``: each is a forward and backward
pass of a layer."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from core.methods import ModelInfo, StepError, load_all, validate_steps
from core.methods.quantize_autoround import DEFAULT_ITERS, QuantizeAutoRoundParams
from core.methods.quantize_gptq import QuantizeGPTQParams

FAST = {"iters": 2, "num_samples": 8, "max_length": 32}


def _info(model_type: str = "llama", files=("config.json", "tokenizer.json"), **config) -> ModelInfo:
    return ModelInfo(
        format="hf",
        architecture="LlamaForCausalLM",
        config={"model_type": model_type, "hidden_size": 64, "intermediate_size": 128, **config},
        files=files,
    )


def _errors(params: dict, info: ModelInfo, has_dataset: bool = True) -> list[dict]:
    try:
        validate_steps([{"method": "quantize.autoround", "params": params}], info, has_dataset=has_dataset)
    except StepError as e:
        return e.errors
    return []


# --- parameters and refusals (unit) ---------------------------------------------------------


@pytest.mark.unit
def test_params_defaults_and_strictness():
    p = QuantizeAutoRoundParams.model_validate({})
    assert (p.scheme, p.iters, p.ignore, p.group_size, p.strict_group_size) == ("W4A16", 200, ["lm_head"], None, False)
    assert DEFAULT_ITERS == 200  # llm-compressor's AutoRoundModifier default and the paper's
    assert p.effective_group("W4A16") == 128
    p8 = QuantizeAutoRoundParams.model_validate({"scheme": "W8A16"})
    assert p8.effective_group("W8A16") is None  # per channel
    assert QuantizeAutoRoundParams.model_validate({"group_size": None}).effective_group("W4A16") is None
    ok = QuantizeAutoRoundParams.model_validate({"scheme": "W4A16", "group_size": 32, "iters": 5, "ignore": ["x"]})
    assert (ok.group_size, ok.iters, ok.ignore) == (32, 5, ["x"])
    # The public names: exactly these parameters (the calibration ones shared with GPTQ).
    gptq_only = {"dampening_frac", "actorder", "observer"}
    assert set(QuantizeAutoRoundParams.model_fields) == set(QuantizeGPTQParams.model_fields) - gptq_only | {"iters"}
    for bad in (
        {"scheme": "W8A8"},  # GPTQ has it; AutoRound here does not
        {"scheme": "w4a16"},
        {"scheme": "NVFP4"},
        {"iters": 0},
        {"iters": -1},
        {"iters": 10_001},
        {"iters": "many"},
        {"group_size": 48},
        {"lr": 0.01},
        {"ignore": "lm_head"},
    ):
        with pytest.raises(ValueError):
            QuantizeAutoRoundParams.model_validate(bad)


@pytest.mark.unit
def test_registered_for_cpu_and_gpu_workers():
    spec = load_all()["quantize.autoround"]
    # Not on the block path: AutoRoundModifier's own offloading handling breaks on disk offload.
    assert spec.needs_data and spec.final and not spec.blocks and not spec.needs_gpu and not spec.streams
    assert spec.formats == frozenset({"hf"})
    ids = {c.id for c in spec.constraints()}
    assert {"dataset_required", "group_divides_inputs", "linear_layers_only", "tokenizer_required"} <= ids
    assert "autoround_multiples_of_32" in ids
    assert "gpu_only" not in ids
    for word in ("iters", "W4A16", "W8A16", "group_size", "ignore", "CPU", "unquantized_layers"):
        assert word in spec.description, word
    described = spec.describe()
    assert described["params_schema"]["properties"]["iters"]["default"] == 200


@pytest.mark.unit
def test_no_dataset_is_refused_and_says_why():
    (err,) = _errors({}, _info(), has_dataset=False)
    assert err["constraint"] == "dataset_required" and err["loc"] == ["body", "dataset_id"]
    assert err["msg"] == "quantize.autoround needs data: give the job a dataset_id"
    assert _errors({}, _info()) == []


@pytest.mark.unit
def test_models_it_cannot_quantize_are_refused():
    (err,) = _errors({}, _info(model_type="gpt2"))
    assert err["constraint"] == "linear_layers_only" and "Conv1D" in err["msg"] and "quantize.autoround" in err["msg"]
    (err,) = _errors({}, _info(quantization_config={"quant_method": "compressed-tensors"}))
    assert err["constraint"] == "not_quantized"
    (err,) = _errors({}, _info(files=("config.json",)))
    assert err["constraint"] == "tokenizer_required"
    (err,) = _errors({}, ModelInfo(format="safetensors"))
    assert err["constraint"] == "model_format"
    (err,) = _errors({"scheme": "W8A8"}, _info())
    assert err["loc"][-1] == "scheme"


@pytest.mark.unit
def test_a_model_with_no_layer_autoround_can_quantize_is_refused_at_submit():
    from core.jobs.plan import Tensor

    def info(shapes: dict[str, tuple[int, int]]) -> ModelInfo:
        headers = [Tensor(f"{n}.weight", "BF16", s) for n, s in shapes.items()]
        headers += [Tensor("model.embed_tokens.weight", "BF16", (100, 48)), Tensor("lm_head.weight", "BF16", (100, 48))]
        return ModelInfo("hf", "LlamaForCausalLM", {"model_type": "llama"}, ("tokenizer.json",), lambda: headers)

    narrow = {"model.layers.0.self_attn.q_proj": (48, 48), "model.layers.0.mlp.down_proj": (48, 96)}
    (err,) = _errors({"group_size": None}, info(narrow))
    assert err["constraint"] == "autoround_multiples_of_32" and "multiples of 32" in err["msg"]
    assert "model.layers.0.self_attn.q_proj: 48 x 48" in err["msg"]
    # One layer it can quantize is enough (the others stay in float, listed in the metrics).
    assert _errors({"group_size": None}, info({**narrow, "model.layers.0.mlp.up_proj": (96, 64)})) == []
    # A layer left out by ``ignore`` does not count.
    one = {**narrow, "model.layers.0.mlp.up_proj": (96, 64)}
    (err,) = _errors({"group_size": None, "ignore": ["lm_head", "up_proj"]}, info(one))
    assert err["constraint"] == "autoround_multiples_of_32"


@pytest.mark.unit
def test_group_size_falls_back_unless_strict():
    # hidden 96: groups of 64 do not divide it (32 does).
    info = _info(hidden_size=96, intermediate_size=192)
    assert _errors({"group_size": 64}, info) == []
    (err,) = _errors({"group_size": 64, "strict_group_size": True}, info)
    assert err["constraint"] == "group_divides_inputs" and "group_size 64" in err["msg"]
    assert _errors({"group_size": 32, "strict_group_size": True}, info) == []


# --- whole runs on a tiny Llama (integration) -----------------------------------------------


def _llama(path: Path, hidden: int = 64, inter: int = 128, kv_heads: int = 2) -> Path:
    """Widths that are multiples of 32 (AutoRound's rule for integer weights): every projection,
    k/v included (2 KV heads of 16 = 32 outputs), is quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_util import _special_ids, save_with_tokenizer, vocab

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=len(vocab()),
        max_position_embeddings=64,
        **_special_ids(),
    )
    return save_with_tokenizer(LlamaForCausalLM(cfg), path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("autoround") / "llama")


IDS = [[5, 9, 11, 3, 7, 2, 8, 4, 12, 6]]


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits[0].float()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.slow
@pytest.mark.integration
def test_job_on_a_cpu_worker_loads_in_transformers_and_stays_close(embedded, llama, tmp_path):
    from tests.helpers import upload_dir, wait_job
    from tests.tokenizer_util import txt_dataset

    c = embedded.client()
    model_id = upload_dir(c, llama).json()["id"]
    step = {"method": "quantize.autoround", "params": {"scheme": "W4A16", "group_size": 32, **FAST}}
    r = c.post("/v1/jobs", json={"model_id": model_id, "steps": [step], "evaluation": {"enabled": False}})
    assert r.status_code == 422, r.text
    (err,) = r.json()["errors"]
    assert "quantize.autoround needs data" in err["msg"] and err["constraint"] == "dataset_required"

    data = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())}).json()["id"]
    r = c.post(
        "/v1/jobs",
        json={"model_id": model_id, "steps": [step], "dataset_id": data, "evaluation": {"enabled": False}},
    )
    assert r.status_code == 202, r.text
    assert r.json()["queue"] == "cpu"
    job = wait_job(c, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    m = job["metrics"]["steps"][0]
    assert (m["scheme"], m["group_size"], m["iters"], m["group_fallbacks"]) == ("W4A16", 32, 2, {})
    assert m["unquantized_layers"] == [] and m["device"] == "cpu" and m["pipeline"] == "sequential"
    assert m["calibration_samples"] == 8

    art = c.get(f"/v1/jobs/{job['id']}/artifact")
    assert art.status_code == 200
    out = tmp_path / "artifact"
    zipfile.ZipFile(io.BytesIO(art.content)).extractall(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert qc["ignore"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.k_proj.weight_packed" in names
    assert "model.layers.0.self_attn.k_proj.weight" not in names
    original, quantized = _logits(llama), _logits(out)
    assert torch.isfinite(quantized).all()
    assert not torch.equal(original, quantized)  # the weights really changed
    assert _close(original, quantized) > 0.98, _close(original, quantized)


def _run(src: Path, params: dict, out: Path, offload: Path | None = None) -> dict:
    from tests.test_fp_quant import _Ctx
    from worker import methods, model_io

    spec = methods.load_all()["quantize.autoround"]
    loaded = model_io.load(src, "hf", offload)
    metrics = spec.handler(loaded, spec.params.model_validate(params), _Ctx())
    model_io.save(loaded, out, {})
    return metrics


@pytest.mark.slow
@pytest.mark.integration
def test_w8a16_per_channel_and_layers_kept_in_float_are_listed(tmp_path):
    # One KV head of 16: k_proj and v_proj have 16 outputs, not a multiple of 32, so AutoRound keeps
    # them in float (its rule); the metrics and the artifact's ignore list say so.
    src = _llama(tmp_path / "one-kv-head", kv_heads=1)
    m = _run(src, {"scheme": "W8A16", **FAST}, tmp_path / "out")
    assert (m["scheme"], m["group_size"], m["iters"]) == ("W8A16", None, 2)
    kept = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("k", "v")]
    assert m["unquantized_layers"] == kept and "multiple of 32" in m["unquantized_reason"]
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert set(kept) <= set(qc["ignore"])
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    assert _close(_logits(src), _logits(tmp_path / "out")) > 0.999


@pytest.mark.integration
def test_a_model_with_no_layer_autoround_can_quantize_fails_before_tuning(tmp_path):
    # hidden 48: every projection has a dimension of 48 (or 24 for k/v), none a multiple of 32.
    src = _llama(tmp_path / "narrow", hidden=48, inter=96)
    with pytest.raises(ValueError, match="would leave every layer in float"):
        _run(src, FAST, tmp_path / "out")
    assert not (tmp_path / "out").exists()
