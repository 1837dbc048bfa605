"""quantize.fp8 and quantize.fp4 (issue 22 item 4): parameters and submit-time refusals; on a tiny
Llama, every data-free scheme in memory (the artifact loads in plain transformers on a CPU and its
logits stay close to the original's), the streaming form bit for bit equal to the in-memory path,
FP8 static calibrated on a tiny dataset; on a GPU, the artifact runs there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch

from core.jobs.plan import Tensor
from core.methods import ModelInfo, Refusal, StepError, load_all, validate_steps
from core.methods.quantize_fp4 import GROUP, QuantizeFP4Params
from core.methods.quantize_fp8 import QuantizeFP8Params

DATA_FREE = [("quantize.fp8", "FP8_DYNAMIC"), ("quantize.fp8", "FP8_BLOCK"), ("quantize.fp4", "NVFP4A16")]
DATA_FREE += [("quantize.fp4", "MXFP4A16"), ("quantize.fp4", "MXFP4")]


def _llama(path: Path, *, hidden: int = 128, inter: int = 256, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_util import build_tokenizer, vocab

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab()),
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("fp") / "llama")


# --- parameters and refusals (unit) ---------------------------------------------------------


@pytest.mark.unit
def test_params_defaults_and_strictness():
    p = QuantizeFP8Params.model_validate({})
    assert (p.scheme, p.ignore) == ("FP8_DYNAMIC", ["lm_head"])
    assert QuantizeFP4Params.model_validate({}).scheme == "NVFP4A16"
    for bad in ({"scheme": "fp8_dynamic"}, {"scheme": "W4A16"}, {"group_size": 128}, {"ignore": "lm_head"}):
        with pytest.raises(ValueError):
            QuantizeFP8Params.model_validate(bad)
    with pytest.raises(ValueError):
        QuantizeFP4Params.model_validate({"scheme": "NVFP8"})


@pytest.mark.unit
def test_methods_are_registered_with_their_needs():
    specs = load_all()
    for name in ("quantize.fp8", "quantize.fp4"):
        spec = specs[name]
        assert spec.streams and spec.final and spec.formats == frozenset({"hf"})
        assert "vLLM" in spec.description and "dequantiz" in spec.description


def _header(name: str, shape: tuple[int, int]) -> Tensor:
    return Tensor(name, "BF16", shape)


def _info(widths: dict[str, int], model_type: str = "llama", files=("config.json", "tokenizer.json")) -> ModelInfo:
    headers = [_header(f"{n}.weight", (64, w)) for n, w in widths.items()]
    headers.append(_header("model.embed_tokens.weight", (100, 64)))
    return ModelInfo(
        format="hf",
        architecture="LlamaForCausalLM",
        config={"model_type": model_type, "hidden_size": 64},
        files=files,
        tensors=lambda: headers,
    )


def _errors(method: str, params: dict, info: ModelInfo, has_dataset: bool = True) -> list[dict]:
    try:
        validate_steps([{"method": method, "params": params}], info, has_dataset=has_dataset)
    except StepError as e:
        return e.errors
    return []


@pytest.mark.unit
@pytest.mark.parametrize("scheme", ["NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4"])
def test_fp4_refuses_widths_its_groups_cannot_express(scheme):
    group = GROUP[scheme]
    ok = {"model.layers.0.mlp.up_proj": 64, "model.layers.0.mlp.down_proj": 128}
    assert _errors("quantize.fp4", {"scheme": scheme}, _info(ok)) == []
    bad = {**ok, "model.layers.0.mlp.down_proj": 120}  # 120 = 7.5 groups of 16, 3.75 of 32
    (err,) = _errors("quantize.fp4", {"scheme": scheme}, _info(bad))
    assert err["constraint"] == "fp4_group_divides_inputs" and err["loc"][-1] == "scheme"
    assert f"groups of {group}" in err["msg"] and "model.layers.0.mlp.down_proj: 120" in err["msg"]
    assert err["blocking_layers"] == [{"name": "model.layers.0.mlp.down_proj", "in_features": 120}]
    # Ignored layers are not quantized, so they do not block.
    assert _errors("quantize.fp4", {"scheme": scheme, "ignore": ["lm_head", "down_proj"]}, _info(bad)) == []


@pytest.mark.unit
def test_nvfp4_refuses_ignoring_part_of_a_fused_group():
    layers = {
        f"model.layers.0.{n}": 64 for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj")
    }
    info = _info(layers)
    (err,) = _errors("quantize.fp4", {"ignore": ["lm_head", "up_proj"]}, info)
    assert err["constraint"] == "fused_layers_together" and err["loc"][-1] == "ignore"
    assert err["split_groups"] == [["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]]
    assert _errors("quantize.fp4", {"ignore": ["lm_head", "up_proj", "gate_proj"]}, info) == []
    assert _errors("quantize.fp4", {"scheme": "MXFP4A16", "ignore": ["up_proj"]}, info) == []


@pytest.mark.integration
def test_nvfp4_split_fused_group_refused_by_the_worker(llama, tmp_path):
    with pytest.raises(Refusal, match="all or none"):
        _run_in_memory(llama, "quantize.fp4", {"ignore": ["lm_head", "k_proj"]}, tmp_path / "out")
    with pytest.raises(Refusal, match="all or none"):
        _stream(llama, "quantize.fp4", {"ignore": ["lm_head", "k_proj"]}, tmp_path / "s")


@pytest.mark.unit
def test_fp8_block_refuses_input_widths_not_a_multiple_of_128():
    ok = {"model.layers.0.self_attn.k_proj": 128, "model.layers.0.mlp.down_proj": 256}
    assert _errors("quantize.fp8", {"scheme": "FP8_BLOCK"}, _info(ok)) == []
    bad = {**ok, "model.layers.0.mlp.down_proj": 576}
    (err,) = _errors("quantize.fp8", {"scheme": "FP8_BLOCK"}, _info(bad))
    assert err["constraint"] == "fp8_block_divides_inputs" and "FP8_DYNAMIC" in err["msg"]
    assert "groups of 128" in err["msg"] and "down_proj: 576" in err["msg"]
    assert _errors("quantize.fp8", {"scheme": "FP8_DYNAMIC"}, _info(bad)) == []


@pytest.mark.unit
def test_fp4_falls_back_on_config_widths():
    # 80 = 5 groups of 16, 2.5 of 32.
    info = ModelInfo(format="hf", config={"model_type": "llama", "hidden_size": 80, "intermediate_size": 256})
    (err,) = _errors("quantize.fp4", {"scheme": "MXFP4A16"}, info)
    assert "hidden_size: 80" in err["msg"]
    assert _errors("quantize.fp4", {"scheme": "NVFP4A16"}, info) == []


@pytest.mark.unit
@pytest.mark.parametrize("method", ["quantize.fp8", "quantize.fp4"])
def test_refusals_shared_with_the_other_quantizers(method):
    (err,) = _errors(method, {}, _info({"h.0.mlp.c_fc": 64}, model_type="gpt2"))
    assert err["constraint"] == "linear_layers_only" and "Conv1D" in err["msg"]
    quantized = ModelInfo(format="hf", config={"model_type": "llama", "quantization_config": {"quant_method": "fp8"}})
    (err,) = _errors(method, {}, quantized)
    assert err["constraint"] == "not_quantized"
    (err,) = _errors(method, {}, ModelInfo(format="safetensors"))
    assert err["constraint"] == "model_format"


@pytest.mark.unit
@pytest.mark.parametrize(("method", "scheme"), [("quantize.fp8", "FP8"), ("quantize.fp4", "NVFP4")])
def test_calibrated_schemes_need_a_tokenizer(method, scheme):
    no_tok = _info({"model.layers.0.mlp.up_proj": 64}, files=("config.json",))
    (err,) = _errors(method, {"scheme": scheme}, no_tok)
    assert err["constraint"] == "tokenizer_required"
    data_free = "FP8_DYNAMIC" if method == "quantize.fp8" else "NVFP4A16"
    assert _errors(method, {"scheme": data_free}, no_tok) == []


# --- on a tiny Llama (integration) ----------------------------------------------------------


class _Ctx:
    """What the handlers read of a job: its dataset and progress."""

    def samples(self, which: str = "train") -> list[dict]:
        from tests.tokenizer_util import sentences

        return [{"text": t} for t in sentences()]

    def step_progress(self, *a: object) -> None: ...

    def progress(self, *a: object) -> None: ...


def _run_in_memory(src: Path, method: str, params: dict, out: Path) -> dict:
    from worker import methods, model_io

    spec = methods.load_all()[method]
    loaded = model_io.load(src, "hf")
    metrics = spec.handler(loaded, spec.params.model_validate(params), _Ctx())
    model_io.save(loaded, out, {})
    return metrics


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    # In the checkpoint's dtype (bf16): FP4 weights decompress to it.
    m = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return m(torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16]])).logits.float()


@pytest.mark.integration
@pytest.mark.parametrize(("method", "scheme"), DATA_FREE)
def test_data_free_scheme_loads_in_transformers_close_to_the_original(llama, tmp_path, method, scheme):
    from safetensors import safe_open

    metrics = _run_in_memory(llama, method, {"scheme": scheme}, tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == metrics["format"]
    assert qc["ignore"] == ["lm_head"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        if method == "quantize.fp8":
            assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
        else:
            assert f.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.uint8
            assert ("model.layers.0.mlp.up_proj.weight_global_scale" in names) == scheme.startswith("NV")
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert metrics["layers_quantized"] == 14 and metrics["ignored_layers"] == ["lm_head"]
    assert metrics["scheme"] == scheme and metrics["runs"] == "decompressed"
    # FP8 keeps ~3 significant bits, FP4 ~1: relative RMS error of the weights.
    assert 0 < metrics["relative_rms_error"] < (0.05 if method == "quantize.fp8" else 0.2)
    a, b = _logits(llama), _logits(tmp_path / "out")
    rel = float((a - b).norm() / a.norm())
    # Random weights, activations quantized too (but A16): loose bounds, FP4 looser.
    assert rel < (0.1 if method == "quantize.fp8" else 0.3), rel


def _stream(src: Path, method: str, params: dict, out: Path):
    from tests.test_stream import _stream as stream

    return stream(src, "hf", [(method, params)], out)


IGNORE = ["lm_head", "down_proj", "layers.1.self_attn.q_proj", "re:.*layers\\.0\\.mlp\\.up_proj$"]
BIT_CASES = [(m, {"scheme": s}) for m, s in DATA_FREE]
BIT_CASES += [("quantize.fp8", {"scheme": "FP8_DYNAMIC", "ignore": IGNORE}), ("quantize.fp4", {"ignore": IGNORE})]
BIT_CASES[-1] = ("quantize.fp4", {"scheme": "MXFP4A16", "ignore": IGNORE})  # NVFP4: fused groups whole


@pytest.mark.integration
@pytest.mark.parametrize(("method", "params"), BIT_CASES, ids=[f"{m}-{json.dumps(p)}" for m, p in BIT_CASES])
def test_streamed_equals_in_memory_bit_for_bit(llama, tmp_path, method, params):
    from tests.test_stream import _same, _whole

    (wm,), counts, sparsity = _whole(llama, "hf", [(method, params)], tmp_path / "whole")
    res = _stream(llama, method, params, tmp_path / "stream")
    _same(tmp_path / "whole", tmp_path / "stream")
    assert res.parameters == counts and res.sparsity == sparsity
    ca = json.loads((tmp_path / "whole" / "config.json").read_text())
    cb = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert ca["quantization_config"] == cb["quantization_config"]
    (sm,) = res.step_metrics
    assert sm.keys() == wm.keys()
    for k, v in wm.items():
        if k == "per_layer_relative_error":
            assert sm[k].keys() == v.keys()
            assert all(sm[k][n] == pytest.approx(v[n], abs=2e-6) for n in v)
        elif isinstance(v, float):
            assert sm[k] == pytest.approx(v, rel=1e-5), k
        else:
            assert sm[k] == v, k
    assert res.notes["runs"] == "decompressed" and "dequantize" in res.notes["runs_detail"]
    if "ignore" in params:
        # Names, dotted suffixes and regexes, read as the submit-time check reads them.
        kept = {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
        kept |= {"lm_head", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"}
        assert set(wm["ignored_layers"]) == kept and wm["layers_quantized"] == 14 - len(kept) + 1
        assert set(ca["quantization_config"]["ignore"]) == kept


def _planned_bytes(src: Path, method: str, params: dict) -> int:
    from core.jobs import plan

    with open(src / "model.safetensors", "rb") as f:
        tensors = plan.read_header(f, 1 << 20)
    outs = [plan._Out(t, t.nbytes) for t in tensors]
    plan._apply_step(outs, method, params, [], None)
    return sum(o.nbytes for o in outs)


def _stored_bytes(d: Path) -> int:
    from tests.test_stream import _tensors

    return sum(t.numel() * t.element_size() for t in _tensors(d).values())


@pytest.mark.integration
@pytest.mark.parametrize(("method", "scheme"), DATA_FREE)
def test_plan_counts_the_artifact_bytes_exactly(llama, tmp_path, method, scheme):
    _stream(llama, method, {"scheme": scheme}, tmp_path / "s")
    assert _planned_bytes(llama, method, {"scheme": scheme}) == _stored_bytes(tmp_path / "s")


@pytest.mark.unit
def test_plan_streams_the_data_free_schemes_only():
    from core.jobs import plan
    from core.methods.quantize_fp4 import DATA_FREE as FP4_FREE
    from core.methods.quantize_fp8 import DATA_FREE as FP8_FREE

    reg = load_all()
    for method, free in (("quantize.fp8", FP8_FREE), ("quantize.fp4", FP4_FREE)):
        schemes = set(get_args(reg[method].params.model_fields["scheme"].annotation))
        assert plan.CALIBRATED_SCHEMES[method] == schemes - free
        assert plan.DEFAULT_SCHEME[method] == reg[method].params.model_fields["scheme"].default
        for scheme in schemes:
            assert plan.stream_capable([{"method": method, "params": {"scheme": scheme}}], reg) == (scheme in free)
        assert plan.stream_capable([{"method": method, "params": {}}], reg)
    # The whole-tensor steps' memory follows the largest quantized weight, not a row chunk.
    big = [plan.Tensor("model.layers.0.mlp.up_proj.weight", "BF16", (16384, 8192))]
    _, peak = plan._steps_peak("stream", big, [{"method": "quantize.fp8", "params": {}}], 1.0, 0)
    _, chunked = plan._steps_peak("stream", big, [{"method": "quantize.weight_only", "params": {"bits": 4}}], 1.0, 0)
    assert peak - plan.BASELINE_BYTES == int(plan.STREAM_FACTORS["quantize.fp8"] * 16384 * 8192 * 4) > chunked


@pytest.mark.integration
@pytest.mark.parametrize(("method", "scheme"), DATA_FREE)
def test_memory_bytes_is_what_transformers_loads(llama, tmp_path, method, scheme):
    """The report's in-memory size: every parameter and buffer as transformers loads the artifact
    on a CPU, after the first forward has decompressed it."""
    from transformers import AutoModelForCausalLM

    res = _stream(llama, method, {"scheme": scheme}, tmp_path / "s")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    m(torch.tensor([[1, 2, 3]]))
    seen: set[int] = set()
    total = 0
    for t in [*m.parameters(), *m.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    assert res.memory_bytes == total


@pytest.mark.integration
def test_streamed_nvfp4_shares_the_global_scale_of_fused_layers(llama, tmp_path):
    from tests.test_stream import _tensors

    _stream(llama, "quantize.fp4", {"scheme": "NVFP4A16"}, tmp_path / "s")
    t = _tensors(tmp_path / "s")
    p = "model.layers.1."
    q, k, v = (t[f"{p}self_attn.{x}_proj.weight_global_scale"] for x in "qkv")
    assert torch.equal(q, k) and torch.equal(k, v)
    assert torch.equal(t[f"{p}mlp.gate_proj.weight_global_scale"], t[f"{p}mlp.up_proj.weight_global_scale"])
    assert not torch.equal(q, t[f"{p}self_attn.o_proj.weight_global_scale"])


@pytest.mark.integration
def test_fp4_refused_by_the_worker_on_widths_it_cannot_express(tmp_path):
    src = _llama(tmp_path / "odd", inter=120)  # down_proj's input: 120 columns
    with pytest.raises(Refusal, match="groups of 32"):
        _run_in_memory(src, "quantize.fp4", {"scheme": "MXFP4A16"}, tmp_path / "out")
    with pytest.raises(Refusal, match="down_proj"):
        _stream(src, "quantize.fp4", {"scheme": "NVFP4A16"}, tmp_path / "s")


@pytest.mark.integration
@pytest.mark.slow
def test_nvfp4_calibrates_the_activations_global_scale(llama, tmp_path):
    from safetensors import safe_open

    metrics = _run_in_memory(llama, "quantize.fp4", {"scheme": "NVFP4", "num_samples": 8}, tmp_path / "out")
    assert metrics["calibration_samples"] == 8 and metrics["format"] == "nvfp4-pack-quantized"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        g = f.get_tensor("model.layers.0.self_attn.q_proj.input_global_scale")
    assert g.numel() == 1 and float(g) > 0
    assert _planned_bytes(llama, "quantize.fp4", {"scheme": "NVFP4"}) == _stored_bytes(tmp_path / "out")
    a, b = _logits(llama), _logits(tmp_path / "out")
    assert float((a - b).norm() / a.norm()) < 0.5


@pytest.mark.integration
def test_calibrated_schemes_do_not_stream(llama):
    from worker import methods
    from worker.stream import NotStreamable

    for method, scheme in (("quantize.fp8", "FP8"), ("quantize.fp4", "NVFP4")):
        spec = methods.load_all()[method]
        with pytest.raises(NotStreamable):
            spec.stream(spec.params.model_validate({"scheme": scheme}), None)


@pytest.mark.integration
@pytest.mark.slow
def test_fp8_static_calibrates_on_the_dataset(llama, tmp_path):
    from safetensors import safe_open

    metrics = _run_in_memory(llama, "quantize.fp8", {"scheme": "FP8", "num_samples": 8}, tmp_path / "out")
    assert metrics["calibration_samples"] == 8
    assert _planned_bytes(llama, "quantize.fp8", {"scheme": "FP8"}) == _stored_bytes(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.input_scale")
    assert scale.numel() == 1 and float(scale) > 0
    a, b = _logits(llama), _logits(tmp_path / "out")
    assert float((a - b).norm() / a.norm()) < 0.1


# --- through the service (integration) ------------------------------------------------------

EVAL = {"runs": 1, "warmup": 0, "max_samples": 8, "seq_len": 32, "budget_s": 3600}


@pytest.mark.integration
@pytest.mark.slow
def test_jobs_through_the_service(embedded, llama, tmp_path):
    """A data-free scheme streams, a calibrated one runs in memory on the job's dataset; the
    report says the quality is the dequantized weights'; FP4 on widths it cannot express is refused
    at submit."""
    from tests.helpers import upload_dir, wait_job
    from tests.tokenizer_util import txt_dataset

    c = embedded.client()
    model = upload_dir(c, llama).json()["id"]
    r = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())})
    assert r.status_code == 201, r.text
    data = r.json()["id"]

    def submit(step: dict, dataset: str | None = None):
        body = {"model_id": model, "steps": [step], "dataset_id": dataset, "evaluation": EVAL}
        return c.post("/v1/jobs", json=body)

    for step, dataset, path in (
        ({"method": "quantize.fp8", "params": {"scheme": "FP8_DYNAMIC"}}, None, "stream"),
        ({"method": "quantize.fp8", "params": {"scheme": "FP8", "num_samples": 8}}, data, "whole"),
    ):
        r = submit(step, dataset)
        assert r.status_code == 202, r.text
        assert r.json()["plan"]["path"] == path
        job = wait_job(c, r.json()["id"], timeout=600)
        assert job["status"] == "succeeded", job
        report = c.get(f"/v1/jobs/{job['id']}/report").json()
        assert report["notes"]["runs"] == "decompressed" and "dequantized weights" in report["notes"]["runs_detail"]
        (m,) = report["steps"]
        assert m["scheme"] == step["params"]["scheme"] and m["layers_quantized"] == 14

    odd = upload_dir(c, _llama(tmp_path / "odd", inter=120)).json()["id"]
    r = c.post(
        "/v1/jobs", json={"model_id": odd, "steps": [{"method": "quantize.fp4", "params": {"scheme": "MXFP4A16"}}]}
    )
    assert r.status_code == 422 and "groups of 32" in r.text and "down_proj" in r.text, r.text


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.gpu
@pytest.mark.parametrize(("method", "scheme"), [("quantize.fp8", "FP8_DYNAMIC"), ("quantize.fp4", "NVFP4A16")])
def test_artifact_runs_on_a_gpu(llama, tmp_path, method, scheme):
    from transformers import AutoModelForCausalLM

    _stream(llama, method, {"scheme": scheme}, tmp_path / "s")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.bfloat16).to("cuda")
    with torch.no_grad():
        out = m(torch.tensor([[2, 10, 11, 12]], device="cuda")).logits
    assert torch.isfinite(out).all()


@pytest.mark.unit
def test_calibrated_schemes_without_a_dataset_are_refused_at_submit() -> None:
    from core.methods import StepError, validate_steps

    for method, scheme in (("quantize.fp8", "FP8"), ("quantize.fp4", "NVFP4")):
        with pytest.raises(StepError) as e:
            validate_steps([{"method": method, "params": {"scheme": scheme}}], has_dataset=False)
        err = e.value.errors[0]
        assert err["type"] == "dataset_required" and err["loc"] == ["body", "dataset_id"], err
        assert validate_steps([{"method": method, "params": {"scheme": scheme}}], has_dataset=True)
    for method, scheme in (("quantize.fp8", "FP8_DYNAMIC"), ("quantize.fp4", "NVFP4A16")):
        assert validate_steps([{"method": method, "params": {"scheme": scheme}}], has_dataset=False)
