"""llm-compressor's ``oneshot`` rounds the offset norms of Gemma-style models (``x * (1 + w)``) it
swaps out and back: ``worker.llmc.exact_offset_norms`` puts back the ones no modifier changed.
Found on Gemma 3 270M (docs/QUALITY.md): every llm-compressor job moved its bf16 norms by up to
0.06. Here: the logic on a bare module (unit), then FP8 (data-free ``oneshot``) and GPTQ (the
calibrated pipeline) on a tiny bf16 Gemma 3 whose saved norms must equal the input's bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _round_trip(w: torch.Tensor) -> torch.Tensor:
    """What llm-compressor's CalibrationOffsetNorm does to a norm it swaps out and restores."""
    return ((1.0 + w.float()).to(w.dtype).float() - 1.0).to(w.dtype)


def _norm_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # Spread over several binades, as trained Gemma norms are (-1..150 on Gemma 3 270M): in bf16,
    # 1 + w then - 1 loses low bits of most of them.
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 4).to(torch.bfloat16)


@pytest.mark.unit
def test_untouched_norms_come_back_exact_and_smoothed_ones_stay():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from worker.llmc import exact_offset_norms

    model = torch.nn.ModuleDict({"a": Gemma3RMSNorm(64), "b": Gemma3RMSNorm(64), "lin": torch.nn.Linear(4, 4)})
    model.to(torch.bfloat16)
    with torch.no_grad():
        model["a"].weight.copy_(_norm_values((64,), 0))
        model["b"].weight.copy_(_norm_values((64,), 1))
    a0, b0 = model["a"].weight.detach().clone(), model["b"].weight.detach().clone()
    assert not torch.equal(_round_trip(a0), a0)  # the fixture does lose bits: the test can fail
    with exact_offset_norms(model) as counts, torch.no_grad():
        model["a"].weight.copy_(_round_trip(a0))  # swapped out and back, nothing else
        model["b"].weight.copy_(_round_trip(b0 * 1.5))  # smoothed (AWQ, SmoothQuant)
    assert torch.equal(model["a"].weight, a0)
    assert torch.equal(model["b"].weight, _round_trip(b0 * 1.5))
    assert counts == {"offset_norms_restored": 1, "offset_norms_smoothed": 1, "offset_norms_unchanged": 0}


@pytest.mark.unit
def test_models_without_offset_norms_are_left_alone():
    from worker.llmc import exact_offset_norms

    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    with exact_offset_norms(model) as counts:
        pass
    assert counts == {}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tests.tokenizer_util import build_tokenizer, vocab

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=16,
        vocab_size=len(vocab()),
        max_position_embeddings=64,
    )
    model = Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "norm" in name:
                p.copy_(_norm_values(tuple(p.shape), i))
    path = tmp_path_factory.mktemp("gemma") / "gemma3"
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def _norms(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if "norm" in k}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("quantize.fp8", {"scheme": "FP8_DYNAMIC"}),  # oneshot without data
        ("quantize.gptq", {"scheme": "W4A16", "group_size": 32, "num_samples": 4, "max_length": 32}),
    ],
)
def test_llm_compressor_jobs_keep_the_norms_bit_for_bit(gemma, tmp_path, method, params):
    from tests.test_fp_quant import _run_in_memory

    before = _norms(gemma)
    assert any(not torch.equal(_round_trip(w), w) for w in before.values())
    metrics = _run_in_memory(gemma, method, params, tmp_path / "out")
    after = _norms(tmp_path / "out")
    assert after.keys() == before.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == []
    # 2 layers x (4 norms + q_norm + k_norm) + the final norm
    assert metrics["offset_norms_restored"] == 13 and metrics["offset_norms_smoothed"] == 0


@pytest.mark.integration
def test_block_path_keeps_the_norms_bit_for_bit(gemma, tmp_path):
    """The same on the block path (weights in compressed-tensors' disk offload, read when used)."""
    from tests.test_fp_quant import _Ctx
    from worker import methods, model_io

    spec = methods.load_all()["quantize.gptq"]
    loaded = model_io.load(gemma, "hf", offload_dir=tmp_path / "offload")
    params = {"scheme": "W4A16", "group_size": 32, "num_samples": 4, "max_length": 32}
    metrics = spec.handler(loaded, spec.params.model_validate(params), _Ctx())
    model_io.save(loaded, tmp_path / "out", {})
    before, after = _norms(gemma), _norms(tmp_path / "out")
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    # Here the rounded copy is written to the module but never to the offloaded weight the save
    # reads: the norms read back as they were.
    assert metrics["offset_norms_unchanged"] == 13 and metrics["offset_norms_smoothed"] == 0
