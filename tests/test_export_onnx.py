"""ONNX export (worker/export/onnx.py), its submit-time refusals (core/exports/onnx.py) and the
ONNX Runtime runner (worker/runtimes/ort.py), on tiny models built from configs (hidden 64, 2
layers, the word-level tokenizer of tests/tokenizer_util.py).

Tolerances, float32 ONNX against float32 transformers: 1e-4 absolute on logits and hidden states
(measured: ~2e-7). int8: measured against the float32 ONNX file of the same model, as a fraction of
that file's largest |logit| (see the tests for the bounds and what was measured)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.exports.onnx import CLASSIFICATION_TASK, DECODER_TASK, ENCODER_TASK, MODEL_TYPES, onnx_task, refusals
from tests.tokenizer_util import _special_ids, save_with_tokenizer, sentences, vocab

FP32_TOL = 1e-4
DECODERS = ["llama", "gpt2", "gemma3", "mistral"]

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


# --- refusals (pure) --------------------------------------------------------------------------------


@pytest.mark.unit
def test_supported_model_types_pass() -> None:
    for model_type, task in MODEL_TYPES.items():
        arch = "BertModel" if task == ENCODER_TASK else "XForCausalLM"
        assert refusals({"model_type": model_type, "architectures": [arch]}, {}, None, False) == []
        assert refusals({"model_type": model_type}, {}, "int8_dynamic", False) == []
        assert refusals({"model_type": model_type}, {}, "int8_static", True) == []
    assert refusals({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, {}, None, False) == []


@pytest.mark.unit
def test_unknown_model_type_lists_what_is_supported() -> None:
    (reason,) = refusals({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, {}, None, False)
    assert "'t5'" in reason
    for model_type in MODEL_TYPES:
        assert model_type in reason
    (reason,) = refusals({}, {}, None, False)
    assert "without a model_type" in reason


@pytest.mark.unit
def test_quantize_refusals() -> None:
    (reason,) = refusals(LLAMA, {}, "int8_static", False)
    assert "int8_static" in reason and "dataset" in reason
    (reason,) = refusals(LLAMA, {}, "int4", True)
    assert "'int4'" in reason and "int8_dynamic" in reason


@pytest.mark.unit
def test_heads_and_rope_refusals() -> None:
    (reason,) = refusals({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, {}, None, False)
    assert "BertForMaskedLM" in reason and "BertForSequenceClassification" in reason
    (reason,) = refusals({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, {}, None, False)
    assert "LlamaForSequenceClassification" in reason
    rope = {"rope_type": "dynamic", "factor": 2.0}
    for key in ("rope_parameters", "rope_scaling"):
        (reason,) = refusals({**LLAMA, key: rope}, {}, None, False)
        assert "'dynamic'" in reason
    assert refusals({**LLAMA, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, {}, None, False) == []


@pytest.mark.unit
def test_onnx_task() -> None:
    assert onnx_task(LLAMA) == DECODER_TASK
    assert onnx_task({"model_type": "bert", "architectures": ["BertModel"]}) == ENCODER_TASK
    assert onnx_task({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}) == CLASSIFICATION_TASK
    assert onnx_task({"model_type": "t5"}) is None


@pytest.mark.unit
def test_error_names_the_operator() -> None:
    from worker.export.onnx import _culprit

    err = RuntimeError("Unsupported FX nodes: {'call_function': ['aten.unique_consecutive.default']}")
    assert _culprit(err) == " (operator aten.unique_consecutive.default)"
    assert (
        _culprit(RuntimeError("failed in model.layers.0.self_attn.q_proj"))
        == " (module model.layers.0.self_attn.q_proj)"
    )


@pytest.mark.integration
def test_core_module_is_light() -> None:
    code = (
        "import sys, core.exports.onnx; "
        "bad = {'torch', 'onnx', 'onnxruntime', 'transformers', 'numpy'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=60)


# --- tiny models and their exports (built once per module) -------------------------------------------


def _build(root: Path, name: str) -> Path:
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    torch.manual_seed(0)
    n, ids = len(vocab()), _special_ids()
    bert = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=n)
    model = {
        "llama": lambda: LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=n,
                max_position_embeddings=64,
                **ids,
            )
        ),
        # Sliding windows of 4 tokens, shorter than the test sequences: the masks the exported
        # file builds from attention_mask and the cache must cut them where transformers does.
        "gemma3": lambda: Gemma3ForCausalLM(
            Gemma3TextConfig(
                num_hidden_layers=2,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=n,
                max_position_embeddings=64,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
                **ids,
            )
        ),
        "mistral": lambda: MistralForCausalLM(
            MistralConfig(
                num_hidden_layers=2,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=n,
                max_position_embeddings=64,
                sliding_window=4,
                **ids,
            )
        ),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=n, n_positions=64, **ids)
        ),
        "bert": lambda: BertModel(BertConfig(**bert, pad_token_id=ids["pad_token_id"])),
        "bert-cls": lambda: BertForSequenceClassification(
            BertConfig(**bert, num_labels=3, pad_token_id=ids["pad_token_id"])
        ),
    }[name]()
    return save_with_tokenizer(model.eval(), root / name)


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, Path] = {}
        self.exports: dict[tuple[str, str | None], tuple[Path, dict[str, Any]]] = {}

    def model(self, name: str) -> Path:
        if name not in self.models:
            self.models[name] = _build(self.root / "models", name)
        return self.models[name]

    def export(self, name: str, quantize: str | None = None) -> tuple[Path, dict[str, Any]]:
        """The export's folder and export_onnx's result."""
        from worker.export.onnx import export_onnx

        key = (name, quantize)
        if key not in self.exports:
            out = self.root / "onnx" / f"{name}-{quantize}"
            calibration = _token_ids()[:4] if quantize == "int8_static" else None
            self.exports[key] = out, export_onnx(self.model(name), out, quantize, calibration)
        return self.exports[key]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> _Cache:
    # The exporter's first import (torch.onnx, onnxscript: several seconds) is paid here, once.
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import torch.onnx  # noqa: F401

    return _Cache(tmp_path_factory.mktemp("onnx"))


def _token_ids() -> list[list[int]]:
    v = vocab()
    return [[v["[BOS]"]] + [v[w] for w in s.split()] for s in sentences()]


def _hf(path: Path, cls_name: str) -> Any:
    import transformers

    return getattr(transformers, cls_name).from_pretrained(path).eval()


def _padded(ids: list[list[int]]) -> tuple[Any, Any]:
    import torch

    width = max(map(len, ids))
    arr = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, seq in enumerate(ids):
        arr[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return arr, mask


# --- decoders ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_matches_transformers(cache: _Cache, name: str) -> None:
    import torch

    from worker.runtimes.ort import OrtRunner

    out, result = cache.export(name)
    assert result["files"] == sorted(
        ["config.json", "generation_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    )
    assert result["inputs"][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert result["outputs"] == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert result["bytes"] == sum((out / f).stat().st_size for f in result["files"])
    assert sorted(p.name for p in out.iterdir()) == result["files"]  # no scratch left behind

    runner = OrtRunner(out, threads=1)
    model = _hf(cache.model(name), "AutoModelForCausalLM")
    ids = _token_ids()[:3]  # unequal lengths: right-padded, masked
    arr, mask = _padded(ids)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = model(arr, attention_mask=mask, position_ids=positions).logits.numpy()
    got = runner.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    real = mask.numpy().astype(bool)
    assert np.abs(got - ref)[real].max() < FP32_TOL


@pytest.mark.integration
def test_nodes_keep_their_module(cache: _Cache) -> None:
    """The file keeps each node's PyTorch module (and no stack traces): an ONNX Runtime error that
    names a node is reported with the module it came from."""
    import onnx

    from worker.export.onnx import _node_module, module_of

    path = cache.export("llama")[0] / "model.onnx"
    graph = onnx.load(str(path)).graph
    modules = {module_of(n) for n in graph.node}
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"} <= modules
    assert not any(p.key.endswith("stack_trace") for n in graph.node for p in n.metadata_props)
    node = next(n for n in graph.node if module_of(n) == "model.layers.1.mlp.down_proj" and n.op_type == "MatMul")
    err = RuntimeError(
        f"[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node. Name:'{node.name}'"
    )
    assert _node_module(path, err) == f" (node {node.name} MatMul, module model.layers.1.mlp.down_proj)"


@pytest.mark.integration
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_kv_cache_and_generation(cache: _Cache, name: str) -> None:
    import torch

    from worker.runtimes.ort import OrtRunner

    runner = OrtRunner(cache.export(name)[0], threads=1)
    model = _hf(cache.model(name), "AutoModelForCausalLM")
    ids = _token_ids()[:1]
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()

    # The KV cache: the first 4 tokens, then the rest fed with the returned past, equal the full pass.
    full = np.asarray([ids[0]], dtype=np.int64)
    logits_a, past = runner.step(full[:, :4], np.ones((1, 4), np.int64))
    logits_b, past = runner.step(full[:, 4:], np.ones_like(full), past)
    assert past["past_key_values.0.key"].shape[2] == full.shape[1]
    both = np.concatenate([logits_a, logits_b], axis=1)
    assert np.abs(both - ref).max() < FP32_TOL

    # Greedy generation: with the cache == without it == transformers' generate.
    prompts = [s[:5] for s in _token_ids()[:2]]
    cached = runner.greedy(prompts, 6, cache=True)
    assert cached == runner.greedy(prompts, 6, cache=False)
    with torch.no_grad():
        gen = model.generate(torch.tensor(prompts), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert cached == gen[:, 5:].tolist()


@pytest.mark.integration
def test_int8_dynamic_is_smaller_and_close(cache: _Cache) -> None:
    import onnx

    from worker.export.onnx import SMOOTH_ALPHA
    from worker.runtimes.ort import OrtRunner

    fp32 = cache.export("llama")[0]
    int8, result = cache.export("llama", "int8_dynamic")
    assert result["quantize"] == "int8_dynamic" and result["reduce_range"] is True
    assert result["smoothing"] == {
        "method": "smoothquant",
        "alpha": SMOOTH_ALPHA,
        "groups": 6,
        "statistics": "built-in text",
    }
    # Measured: 184 KB vs 412 KB (0.45x): the tiny model's embeddings (not quantized) are a share.
    assert (int8 / "model.onnx").stat().st_size < 0.6 * (fp32 / "model.onnx").stat().st_size
    ops = {node.op_type for node in onnx.load(str(int8 / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, ops
    ids = _token_ids()[:4]
    ref, got = OrtRunner(fp32, threads=1).logits(ids), OrtRunner(int8, threads=1).logits(ids)
    # Bound: 5 % of the largest |logit| (measured 1.5 %), and the same top-1 token at >= 90 % of
    # positions (measured 100 %).
    mask = _padded(ids)[1].numpy().astype(bool)
    assert np.abs(got - ref)[mask].max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1))[mask].mean() >= 0.9


@pytest.mark.integration
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_smoothing_keeps_the_float_model(cache: _Cache, name: str) -> None:
    """The smoothing before int8 moves scale between a norm (or up_proj) and the linears after it:
    the float model's logits stay what they were (float32 rounding: 1e-4 of the largest)."""
    import torch

    from worker.export.onnx import smooth_activations

    model = _hf(cache.model(name), "AutoModelForCausalLM")
    x = torch.tensor([_token_ids()[5]])
    with torch.no_grad():
        before = model(x).logits
        layer0 = {k: v.clone() for k, v in model.state_dict().items() if ".0." in k}
        groups = smooth_activations(model, _token_ids()[:4])
        after = model(x).logits
    assert groups == (4 if name == "gpt2" else 6)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in layer0.items())  # it did change weights
    assert (after - before).abs().max() < 1e-4 * before.abs().max()


@pytest.mark.integration
def test_int8_static_runs_calibrated(cache: _Cache) -> None:
    import onnx

    from worker.runtimes.ort import OrtRunner

    fp32 = cache.export("llama")[0]
    int8, result = cache.export("llama", "int8_static")
    assert result["quantize"] == "int8_static"
    assert result["smoothing"]["statistics"] == "calibration"
    ops = {node.op_type for node in onnx.load(str(int8 / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    ids = _token_ids()[4:8]  # not the calibration sequences
    ref, got = OrtRunner(fp32, threads=1).logits(ids), OrtRunner(int8, threads=1).logits(ids)
    mask = _padded(ids)[1].numpy().astype(bool)
    # Looser than dynamic (activations quantized with ranges from 4 short sequences): 10 % of the
    # largest |logit| (measured 6.4 %), top-1 agreement >= 80 % (measured 92 %).
    assert np.isfinite(got).all()
    assert np.abs(got - ref)[mask].max() < 0.10 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1))[mask].mean() >= 0.8


# --- encoders ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_encoder_matches_transformers(cache: _Cache) -> None:
    import torch

    from worker.runtimes.ort import OrtRunner

    out, result = cache.export("bert")
    assert result["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert result["outputs"] == ["last_hidden_state"]
    runner = OrtRunner(out, threads=1)
    ids = _token_ids()[:3]
    arr, mask = _padded(ids)
    with torch.no_grad():
        ref = _hf(cache.model("bert"), "BertModel")(arr, attention_mask=mask).last_hidden_state.numpy()
    got = runner.hidden(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref)[mask.numpy().astype(bool)].max() < FP32_TOL
    with pytest.raises(ValueError, match="no classification head"):
        runner.logits(ids)
    assert len(runner.latency_s(batch=2, seq_len=8, runs=2, warmup=1)) == 2


@pytest.mark.integration
def test_classifier_matches_transformers(cache: _Cache) -> None:
    import torch

    from worker.runtimes.ort import OrtRunner

    out, result = cache.export("bert-cls")
    assert result["outputs"] == ["last_hidden_state", "logits"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    runner = OrtRunner(out, threads=1)
    ids = _token_ids()[:3]
    arr, mask = _padded(ids)
    model = _hf(cache.model("bert-cls"), "BertForSequenceClassification")
    with torch.no_grad():
        ref = model(arr, attention_mask=mask, output_hidden_states=True)
    assert runner.logits(ids).shape == (3, 3)
    assert np.abs(runner.logits(ids) - ref.logits.numpy()).max() < FP32_TOL
    hidden = runner.hidden(ids)
    assert np.abs(hidden - ref.hidden_states[-1].numpy())[mask.numpy().astype(bool)].max() < FP32_TOL


# --- failures leave nothing --------------------------------------------------------------------------


@pytest.mark.integration
def test_failures_leave_no_partial_files(cache: _Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.export.onnx as mod

    src = cache.model("llama")
    with pytest.raises(mod.ExportError, match="int8_static"):
        mod.export_onnx(src, tmp_path / "a", "int8_static", None)
    assert not (tmp_path / "a").exists()

    # A failure after a file was written (here: the exporter, stopped halfway) removes the scratch
    # folder, and the output folder when the export created it; a folder that was there keeps
    # what it had.
    def halfway(model: Any, task: str, path: Path) -> None:
        path.write_bytes(b"partial")
        raise mod.ExportError("torch.onnx.export failed for LlamaForCausalLM (operator aten.bogus.default): boom")

    monkeypatch.setattr(mod, "_torch_export", halfway)
    with pytest.raises(mod.ExportError, match="operator aten.bogus"):
        mod.export_onnx(src, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(mod.ExportError):
        mod.export_onnx(src, tmp_path / "c", "int8_dynamic")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["keep.txt"]


@pytest.mark.integration
def test_unloadable_weights_are_an_export_error(cache: _Cache, tmp_path: Path) -> None:
    import shutil

    from worker.export.onnx import ExportError, export_onnx

    src = tmp_path / "broken"
    shutil.copytree(cache.model("llama"), src)
    (src / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ExportError, match="could not load the model with AutoModelForCausalLM"):
        export_onnx(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _int8_weight_extremes(folder: Path) -> tuple[int, int]:
    """The lowest and highest stored value over the model's int8 weight initializers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    lo = hi = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and init.name.endswith("_quantized"):
            a = numpy_helper.to_array(init)
            lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    return lo, hi


@pytest.mark.integration
def test_reduce_range_sets_the_int8_weights_range(cache: _Cache, tmp_path: Path) -> None:
    """7-bit weights by default (what no x86 int8 kernel can saturate), 8 bits when asked."""
    from worker.export.onnx import export_onnx

    seven, result = cache.export("llama", "int8_dynamic")
    assert result["reduce_range"] is True
    lo, hi = _int8_weight_extremes(seven)
    assert lo >= -64 and hi <= 64 and max(-lo, hi) == 64, (lo, hi)  # per-channel: each row reaches its end
    eight = tmp_path / "eight"
    assert export_onnx(cache.model("llama"), eight, "int8_dynamic", reduce_range=False)["reduce_range"] is False
    lo, hi = _int8_weight_extremes(eight)
    assert max(-lo, hi) == 127, (lo, hi)
