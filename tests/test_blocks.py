"""The block path: llm-compressor's methods on a model whose weights stay on disk (compressed-tensors
disk offload; one decoder block onloaded at a time) give the same artifact as on the model built
in memory, and the pipeline's counts read an offloaded model correctly (ties once)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.tokenizer_util import build_models, txt_dataset
from worker import evaluate, methods, model_io, pipeline

pytestmark = pytest.mark.integration  # whole methods run in-process on real tiny models


class _Ctx:
    """The JobContext parts the llm-compressor handlers use: the calibration texts and progress."""

    def __init__(self) -> None:
        lines = txt_dataset().decode().splitlines()
        self._samples = [{"text": t} for t in lines if t.strip()]

    def samples(self, which: str = "train") -> list[dict[str, Any]]:
        return self._samples

    def step_progress(self, note: str, fraction: float) -> None:
        pass


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_models(tmp_path_factory.mktemp("blocks"))["llama"]


def _run(src: Path, out: Path, steps: list[tuple[str, dict]], offload: Path | None) -> tuple[list[dict], dict, dict]:
    loaded = model_io.load(src, "hf", offload)
    assert model_io.is_offloaded(loaded.module) == (offload is not None)
    res = []
    for name, params in steps:
        spec = methods.get(name)
        res.append(spec.handler(loaded, spec.params.model_validate(params), _Ctx()))
    counts = evaluate.parameter_counts(loaded.module, None)
    sparsity = pipeline._sparsity(loaded, counts)
    model_io.save(loaded, out, {"test": True})
    return res, counts, sparsity


@pytest.mark.parametrize(
    "steps",
    [
        [("quantize.gptq", {"scheme": "W4A16", "group_size": 32, "num_samples": 8, "max_length": 32})],
        [("prune.wanda", {"sparsity": 0.5, "num_samples": 8, "max_length": 32})],
    ],
    ids=["gptq", "wanda"],
)
def test_blocks_equal_whole(llama, tmp_path, steps):
    wres, wcounts, wsp = _run(llama, tmp_path / "whole", steps, None)
    bres, bcounts, bsp = _run(llama, tmp_path / "blocks", steps, tmp_path / "offload")
    a, b = (
        load_file(str(tmp_path / "whole" / "model.safetensors")),
        load_file(str(tmp_path / "blocks" / "model.safetensors")),
    )
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert wcounts == bcounts and wsp == bsp
    for w, s in zip(wres, bres, strict=True):
        assert {k: v for k, v in w.items() if k not in ("oneshot_seconds",)} == {
            k: v for k, v in s.items() if k not in ("oneshot_seconds",)
        }


def _artifact(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of a saved folder (all shards) and its config.json."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors, json.loads((out / "config.json").read_text())


def _assert_same_artifact(whole: Path, blocks: Path) -> None:
    a, ca = _artifact(whole)
    b, cb = _artifact(blocks)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    # quantization_config / sparsity_config included: the whole config, key for key.
    assert ca == cb
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in blocks.iterdir())
    for name in ("generation_config.json", "model.safetensors.index.json", "modelpress.json"):
        if (whole / name).exists():
            assert (whole / name).read_bytes() == (blocks / name).read_bytes(), name


CALIBRATED = {
    "gptq": [("quantize.gptq", {"scheme": "W4A16", "group_size": 32, "num_samples": 8, "max_length": 32})],
    "gptq-w8a8": [("quantize.gptq", {"scheme": "W8A8", "num_samples": 8, "max_length": 32})],
    "wanda": [("prune.wanda", {"sparsity": 0.5, "num_samples": 8, "max_length": 32})],
    "sparsegpt": [("prune.sparsegpt", {"mask": "2:4", "num_samples": 8, "max_length": 32})],
    "smoothquant": [("quantize.smoothquant", {"num_samples": 8, "max_length": 32})],
    # AWQ's block path against its in-memory path is tests/test_awq_cpu.py's (the same check, on
    # CPU): not run twice more here (two AWQ calibrations, ~1 min of the suite).
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tied_model(request, tmp_path_factory) -> Path:
    """A model whose LM head is its input embedding (tie_word_embeddings), saved once: a Llama, and a
    Qwen2 (biases on q/k/v_proj, which the compressor carries next to the packed weight)."""
    import transformers

    from tests.tokenizer_util import _special_ids, save_with_tokenizer, vocab

    torch.manual_seed(1)
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[request.param]
    cfg = getattr(transformers, f"{prefix}Config")(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab()),
        max_position_embeddings=64,
        tie_word_embeddings=True,
        **_special_ids(),
    )
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg)
    return save_with_tokenizer(model, tmp_path_factory.mktemp("tied") / request.param)


@pytest.mark.parametrize("shard", [model_io.DEFAULT_SHARD_BYTES, 20_000], ids=["one-file", "sharded"])
@pytest.mark.parametrize("method", list(CALIBRATED))
def test_block_save_equals_whole_save(llama, tmp_path, method, shard):
    """The block path's save (module by module, ct_offload.save_offloaded) writes what the in-memory
    path's save_pretrained writes: every tensor bit for bit, config.json (quantization_config,
    sparsity_config) key for key, the same files, the same shard index."""
    _save_both(llama, tmp_path, CALIBRATED[method], shard)


@pytest.mark.parametrize("method", ["gptq", "wanda"])
def test_block_save_equals_whole_save_tied(tied_model, tmp_path, method):
    """Tied embeddings: both paths write the table once, under the same name."""
    _save_both(tied_model, tmp_path, CALIBRATED[method], model_io.DEFAULT_SHARD_BYTES)
    tensors, config = _artifact(tmp_path / "blocks")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert config["tie_word_embeddings"] is True
    if tied_model.name == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in tensors


def _save_both(src: Path, tmp_path: Path, steps: list[tuple[str, dict]], shard: int) -> None:
    outs = {}
    for kind, offload in (("whole", None), ("blocks", tmp_path / "offload")):
        loaded = model_io.load(src, "hf", offload)
        for name, params in steps:
            spec = methods.get(name)
            spec.handler(loaded, spec.params.model_validate(params), _Ctx())
        assert model_io._saves_module_by_module(loaded) == (offload is not None)
        outs[kind] = tmp_path / kind
        model_io.save(loaded, outs[kind], {"test": True}, max_shard_size=shard)
    if shard < model_io.DEFAULT_SHARD_BYTES:
        assert (outs["whole"] / "model.safetensors.index.json").exists()
    _assert_same_artifact(outs["whole"], outs["blocks"])


def test_block_save_does_not_hold_the_model(tmp_path):
    """Saving the block path's result onloads one module at a time: the anonymous memory the save
    adds (worker/memory.py's RssAnon peak, the figure an OOM kill is about) stays far below the
    model's weight bytes. llm-compressor's save_pretrained of the same offloaded model gathers all
    of it (163 MB above the baseline for this 156 MB model, measured the same way; 11 MB with the
    module-by-module writer)."""
    import ctypes
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizer_util import _special_ids, build_tokenizer, vocab
    from worker.memory import PeakMemory

    torch.manual_seed(0)
    # 156 MB of float32 weights in 12 blocks of 13 MB: large against the allocator's noise. Its
    # result is quantized by SmoothQuant with round-to-nearest W8A8 (int8 weights through
    # compressed-tensors' compressor, the same writer as GPTQ's packed int4): GPTQ's column loop
    # would take minutes here on two shared cores, and the save does not depend on how the scales
    # were found.
    model = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=12,
            hidden_size=512,
            intermediate_size=1536,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=len(vocab()),
            max_position_embeddings=64,
            **_special_ids(),
        )
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    src = tmp_path / "src"
    model.save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    del model

    loaded = model_io.load(src, "hf", tmp_path / "offload")
    spec = methods.get("quantize.smoothquant")
    spec.handler(loaded, spec.params.model_validate({"quantizer": "rtn", "num_samples": 2, "max_length": 16}), _Ctx())
    assert model_io._saves_module_by_module(loaded)
    gc.collect()
    # Hand the heap's free pages back to the system: calibration leaves hundreds of MB freed but
    # resident, which a gathering save would reuse unseen; the baseline is what is really held.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    peak = PeakMemory()
    base = peak._anon * 1024
    model_io.save(loaded, tmp_path / "out", {"test": True})
    added = peak.result()["peak_anon_bytes"] - base
    # The largest module here is 3 MB (down_proj); its onloaded weight, the compressor's
    # temporaries and its output are a few times that. A quarter of the model is a bound any
    # gathering save breaks.
    assert added < weight_bytes / 4, (added, weight_bytes)
    tensors, config = _artifact(tmp_path / "out")
    assert config["quantization_config"]["quantization_status"] == "compressed"
    assert tensors["model.layers.11.mlp.down_proj.weight"].dtype == torch.int8


def test_offloaded_counts_tie_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            tie_word_embeddings=True,
        )
    ).save_pretrained(tmp_path / "src")
    whole = model_io.load(tmp_path / "src", "hf")
    off = model_io.load(tmp_path / "src", "hf", tmp_path / "off")
    assert evaluate.parameter_counts(off.module, None) == evaluate.parameter_counts(whole.module, None)
    assert pipeline._memory_bytes(off) == pipeline._memory_bytes(whole)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(off.module(ids).logits, whole.module(ids).logits)


def test_only_llm_compressor_methods_take_the_block_path():
    blocks = {n for n, s in methods.load_all().items() if s.blocks}
    assert blocks == {"prune.wanda", "prune.sparsegpt", "quantize.gptq", "quantize.smoothquant", "quantize.awq"}
