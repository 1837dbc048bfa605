"""bench/gen_checkpoint.py writes what LlamaForCausalLM.save_pretrained writes: the same tensor
names and shapes, the same shard names and index, files transformers loads. Tiny sizes only."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from bench.gen_checkpoint import generate, parse_size, plan_shape, tensor_shapes

pytestmark = pytest.mark.integration  # whole methods run in-process on real tiny models

TINY = dict(hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2, vocab=1000)


def _meta_state_dict(config):  # noqa: ANN001, ANN202
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.state_dict()


def test_sharded_checkpoint_matches_llama_and_loads(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    # A cap below one layer's bytes: several shards, as a multi-GB upload has.
    info = generate(tmp_path / "ckpt", dtype="bf16", max_shard_size=300_000, tokenizer=True, **TINY)
    out = info.path
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()

    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"] and config.model_type == "llama"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    expected = {k: tuple(v.shape) for k, v in _meta_state_dict(config).items()}
    assert list(tensor_shapes(info.shape)) == list(expected)  # state_dict order decides the sharding

    # The index as save_pretrained writes it, and every tensor where the index says.
    raw = (out / "model.safetensors.index.json").read_text()
    index = json.loads(raw)
    assert raw == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"] == {
        "total_parameters": sum(math.prod(s) for s in expected.values()),
        "total_size": sum(math.prod(s) * 2 for s in expected.values()),
    }
    found = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = f.keys()  # safe_open is not iterable itself
            for k in names:
                assert index["weight_map"][k] == shard
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16
                found[k] = tuple(t.shape)
        # The header is padded to 8 bytes as safetensors pads it.
        assert struct.unpack("<Q", (out / shard).read_bytes()[:8])[0] % 8 == 0
    assert found == expected

    model = LlamaForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    w = sd["model.layers.0.mlp.up_proj.weight"].float()
    assert 0.01 < w.std().item() < 0.04 and abs(w.mean().item()) < 0.005
    assert torch.equal(sd["model.norm.weight"].float(), torch.ones(TINY["hidden"]))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, TINY["vocab"]) and torch.isfinite(logits).all()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello, world")["input_ids"]
    assert ids and max(ids) < TINY["vocab"]
    assert {p.suffix for p in out.iterdir()} == {".json", ".safetensors"}  # what the service accepts


def test_single_file_and_determinism(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    a = generate(tmp_path / "a", dtype="fp16", fill="randn", seed=3, **TINY)
    b = generate(tmp_path / "b", dtype="fp16", fill="randn", seed=3, **TINY)
    assert sorted(a.files) == ["config.json", "generation_config.json", "model.safetensors"]
    assert (a.path / "model.safetensors").read_bytes() == (b.path / "model.safetensors").read_bytes()
    w = load_file(a.path / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    assert w.dtype.name == "float16" and 0.018 < float(w.astype("float32").std()) < 0.022


def test_size_planning() -> None:
    assert parse_size("30GiB") == 30 * 2**30 and parse_size("2GB") == 2 * 10**9 and parse_size("512") == 512
    s = plan_shape(30 * 2**30, "bf16")
    params = sum(math.prod(v) for v in tensor_shapes(s).values())
    assert params * 2 >= 30 * 2**30  # at least the size asked for, within one layer
    assert params * 2 - 30 * 2**30 < 2 * sum(math.prod(v) for k, v in tensor_shapes(s).items() if ".layers.0." in k)
    assert s.hidden % 128 == 0 and s.intermediate % 128 == 0 and s.hidden // s.heads == 128
    assert (s.hidden, s.intermediate) == (5120, 13824)  # Llama-2-13B widths, deeper
    two = plan_shape(2 * 2**30, "bf16")
    assert two.layers >= 16  # the calibrated bench wants >= 16 blocks at 2 GB
    with pytest.raises(ValueError, match="multiple of 128"):
        plan_shape(hidden=100, layers=2, heads=4)
