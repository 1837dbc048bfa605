"""quantize.awq on CPU workers (issue 22 item 3): registered for any worker (the cpu queue, no
longer waiting for a GPU); its refusals at submit; llm-compressor's AWQ, which pins its cached
activations for GPU copies, runs on a machine without an accelerator; a whole job through the
embedded service (a CPU worker) whose artifact loads in plain transformers and stays close to the
original; the block path (weights on disk) writes what the in-memory path writes."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from core.methods import ModelInfo, StepError, load_all, validate_steps

FAST = {"group_size": 32, "num_samples": 4, "max_length": 16}


def _info(architecture: str = "LlamaForCausalLM", model_type: str = "llama", files=("tokenizer.json",)) -> ModelInfo:
    return ModelInfo("hf", architecture, {"model_type": model_type, "hidden_size": 64}, files)


def _errors(params: dict, info: ModelInfo, has_dataset: bool = True) -> list[dict]:
    try:
        validate_steps([{"method": "quantize.awq", "params": params}], info, has_dataset=has_dataset)
    except StepError as e:
        return e.errors
    return []


@pytest.mark.unit
def test_registered_for_cpu_workers():
    spec = load_all()["quantize.awq"]
    assert not spec.needs_gpu and spec.needs_data and spec.final and spec.blocks
    ids = {c.id for c in spec.constraints()}
    assert "gpu_only" not in ids and {"architectures", "dataset_required", "group_divides_inputs"} <= ids
    assert "CPU and GPU workers" in spec.description and "Needs a GPU" not in spec.description
    assert "CPU or GPU" in spec.summary


@pytest.mark.unit
def test_refusals_at_submit():
    assert _errors({}, _info()) == []
    (err,) = _errors({}, _info(), has_dataset=False)
    assert (
        err["constraint"] == "dataset_required" and err["msg"] == "quantize.awq needs data: give the job a dataset_id"
    )
    (err,) = _errors({}, _info("BertModel", "bert"))
    assert err["constraint"] == "architectures" and "no scale-search mappings for BertModel" in err["msg"]
    (err,) = _errors({}, _info("GPT2LMHeadModel", "gpt2"))
    assert err["constraint"] == "linear_layers_only" and "Conv1D" in err["msg"]
    for bad in ({"scheme": "W8A16"}, {"group_size": 48}, {"iters": 5}):
        (err,) = _errors(bad, _info())
        assert err["loc"][:4] == ["body", "steps", 0, "params"], err


@pytest.mark.unit
def test_activation_pinning_is_skipped_without_an_accelerator():
    """llm-compressor 0.14's AWQ pins each layer's cached inputs before its scale search; torch
    cannot pin memory without an accelerator. The handler's patch skips it there, once."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    from worker.methods.quantize_awq import _no_pinning_without_accelerator

    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"hidden_states": torch.ones(2, 3)})
    _no_pinning_without_accelerator()
    patched = IntermediatesCache.pin_memory
    _no_pinning_without_accelerator()
    assert IntermediatesCache.pin_memory is patched  # idempotent: wrapped once per process
    if not torch.accelerator.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            torch.ones(2).pin_memory()  # what the library's pinning would do here
        cache.pin_memory(0)
        assert torch.equal(cache.fetch(0)["hidden_states"], torch.ones(2, 3))


def _llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_util import _special_ids, save_with_tokenizer, vocab

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab()),
        max_position_embeddings=64,
        **_special_ids(),
    )
    return save_with_tokenizer(LlamaForCausalLM(cfg), path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("awq-cpu") / "llama")


IDS = [[5, 9, 11, 3, 7, 2, 8, 4, 12, 6]]


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits[0].float()


@pytest.mark.slow
@pytest.mark.integration
def test_job_runs_on_a_cpu_worker_and_the_artifact_loads(embedded, llama, tmp_path):
    from tests.helpers import upload_dir, wait_job
    from tests.tokenizer_util import txt_dataset

    c = embedded.client()
    model_id = upload_dir(c, llama).json()["id"]
    data = c.post("/v1/datasets", files={"file": ("calib.txt", txt_dataset())}).json()["id"]
    step = {"method": "quantize.awq", "params": FAST}
    r = c.post(
        "/v1/jobs",
        json={"model_id": model_id, "steps": [step], "dataset_id": data, "evaluation": {"enabled": False}},
    )
    assert r.status_code == 202, r.text
    assert (r.json()["queue"], r.json()["progress"]["stage"]) == ("cpu", "queued")
    job = wait_job(c, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    m = job["metrics"]["steps"][0]
    assert (m["scheme"], m["group_size"], m["group_fallbacks"], m["device"]) == ("W4A16", 32, {}, "cpu")
    assert m["calibration_samples"] == 4

    art = c.get(f"/v1/jobs/{job['id']}/artifact")
    out = tmp_path / "artifact"
    zipfile.ZipFile(io.BytesIO(art.content)).extractall(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (4, 32)
    original, quantized = _logits(llama), _logits(out)
    assert torch.isfinite(quantized).all() and not torch.equal(original, quantized)
    cos = float(torch.nn.functional.cosine_similarity(original.flatten(), quantized.flatten(), dim=0))
    assert cos > 0.98, cos


@pytest.mark.slow
@pytest.mark.integration
def test_block_path_on_a_cpu_writes_what_the_in_memory_path_writes(llama, tmp_path):
    """The block path (weights on disk, one decoder layer onloaded at a time), which large models
    take, on a CPU: the artifact is the in-memory path's, tensor for tensor."""
    from safetensors.torch import load_file

    from tests.test_fp_quant import _Ctx
    from worker import methods, model_io

    spec = methods.load_all()["quantize.awq"]
    for kind, offload in (("whole", None), ("blocks", tmp_path / "offload")):
        loaded = model_io.load(llama, "hf", offload)
        spec.handler(loaded, spec.params.model_validate(FAST), _Ctx())
        model_io.save(loaded, tmp_path / kind, {})
    a, b = (load_file(tmp_path / k / "model.safetensors") for k in ("whole", "blocks"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
