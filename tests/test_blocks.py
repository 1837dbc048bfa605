"""The block path: llm-compressor's methods on a model whose weights stay on disk (compressed-tensors
disk offload; one decoder block onloaded at a time) give the same artifact as on the model built
in memory, and the pipeline's counts read an offloaded model correctly (ties once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.tokenizer_util import build_models, txt_dataset
from worker import evaluate, methods, model_io, pipeline


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


@pytest.mark.parametrize("steps", [
    [("quantize.gptq", {"scheme": "W4A16", "group_size": 32, "num_samples": 8, "max_length": 32})],
    [("prune.wanda", {"sparsity": 0.5, "num_samples": 8, "max_length": 32})],
], ids=["gptq", "wanda"])
def test_blocks_equal_whole(llama, tmp_path, steps):
    wres, wcounts, wsp = _run(llama, tmp_path / "whole", steps, None)
    bres, bcounts, bsp = _run(llama, tmp_path / "blocks", steps, tmp_path / "offload")
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "blocks" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert wcounts == bcounts and wsp == bsp
    for w, s in zip(wres, bres, strict=True):
        assert {k: v for k, v in w.items() if k not in ("oneshot_seconds",)} == \
               {k: v for k, v in s.items() if k not in ("oneshot_seconds",)}


def test_offloaded_counts_tie_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)).save_pretrained(tmp_path / "src")
    whole = model_io.load(tmp_path / "src", "hf")
    off = model_io.load(tmp_path / "src", "hf", tmp_path / "off")
    assert evaluate.parameter_counts(off.module, None) == evaluate.parameter_counts(whole.module, None)
    assert pipeline._memory_bytes(off) == pipeline._memory_bytes(whole)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(off.module(ids).logits, whole.module(ids).logits)


def test_only_llm_compressor_methods_take_the_block_path():
    blocks = {n for n, s in methods.load_all().items() if s.blocks}
    assert blocks == {"prune.wanda", "prune.sparsegpt", "quantize.gptq", "quantize.smoothquant", "quantize.awq"}
