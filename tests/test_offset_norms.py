"""llm-compressor's ``oneshot`` swaps the offset norms of Gemma-style models (``x * (1 + w)``) out
and back; ``worker.llmc.exact_offset_norms`` mends two faults of that (docs/QUALITY.md): the
round trip rounded every norm in bf16 (up to 0.06 on Gemma 3 270M, whatever the method), and on the
block path the write-back never reached the offloaded weights, so AWQ's smoothing of those norms
was lost. On a tiny bf16 Gemma 3 with norms spread over several binades: llm-compressor's own swap
with one norm smoothed (unit), FP8 (data-free ``oneshot``) and GPTQ (calibrated) in memory and on
the block path, whose saved norms must equal the input's bit for bit, and AWQ's smoothed norms
equal in memory and on the block path."""

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


def _tiny_gemma() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tests.tokenizer_util import vocab

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
    return model


@pytest.mark.unit
def test_untouched_norms_come_back_exact_and_a_smoothed_one_is_kept():
    from llmcompressor.modeling.offset_norm import norm_calibration_context

    from worker.llmc import exact_offset_norms

    model = _tiny_gemma()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    assert any(not torch.equal(_round_trip(w), w) for w in before.values())  # the test can fail
    smoothed = "model.layers.0.post_attention_layernorm"
    with exact_offset_norms() as counts, norm_calibration_context(model), torch.no_grad():
        swapped = model.get_submodule(smoothed)
        assert type(swapped).__name__ == "CalibrationOffsetNorm"
        swapped.weight.mul_(1.5)  # what AWQ or SmoothQuant does to a norm in front of a layer
        entered = swapped.weight.detach().clone()
    after = dict(model.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved == [f"{smoothed}.weight"]
    assert torch.equal(after[f"{smoothed}.weight"], (entered.float() - 1.0).to(torch.bfloat16))
    assert counts == {"offset_norms_restored": len(before) - 1, "offset_norms_smoothed": 1}


@pytest.mark.unit
def test_llm_compressor_class_is_restored_after_the_context():
    from llmcompressor.modeling.offset_norm import CalibrationOffsetNorm

    from worker.llmc import exact_offset_norms

    init, restore = CalibrationOffsetNorm.__init__, CalibrationOffsetNorm.restore
    with exact_offset_norms() as counts:
        assert CalibrationOffsetNorm.restore is not restore
    assert (CalibrationOffsetNorm.__init__, CalibrationOffsetNorm.restore) == (init, restore)
    assert counts == {}  # nothing swapped: nothing reported


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    from tests.tokenizer_util import build_tokenizer

    model = _tiny_gemma()
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
    assert metrics["offset_norms_restored"] == 13 and metrics["offset_norms_smoothed"] == 0


@pytest.mark.integration
def test_awq_smoothing_of_offset_norms_reaches_the_block_path_artifact(gemma, tmp_path):
    """AWQ folds scales into the norms in front of the layers it smooths: on the block path those
    norms were saved unsmoothed (the linear layers scaled, their norms not: a wrong model)."""
    from tests.test_fp_quant import _Ctx
    from worker import methods, model_io

    spec = methods.load_all()["quantize.awq"]
    params = spec.params.model_validate({"scheme": "W4A16", "group_size": 32, "num_samples": 4, "max_length": 32})
    norms, counts = {}, {}
    for path in ("memory", "block"):
        loaded = model_io.load(gemma, "hf", offload_dir=tmp_path / "offload" if path == "block" else None)
        metrics = spec.handler(loaded, params, _Ctx())
        model_io.save(loaded, tmp_path / path, {})
        norms[path] = _norms(tmp_path / path)
        counts[path] = (metrics["offset_norms_restored"], metrics["offset_norms_smoothed"])
    before = _norms(gemma)
    smoothed = [k for k in before if not torch.equal(before[k], norms["memory"][k])]
    assert smoothed and counts["memory"][1] == len(smoothed)
    assert counts["block"] == counts["memory"]
    assert [k for k in before if not torch.equal(norms["memory"][k], norms["block"][k])] == []
