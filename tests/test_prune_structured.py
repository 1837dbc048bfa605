"""``prune.structured``: the math on tiny tensors, the handler on tiny models built from configs
(in process), and the API round trip (upload → job → artifact loaded with plain transformers)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from core.methods import ModelInfo
from core.methods import prune_structured as ps_core
from tests.helpers import upload_dir, wait_job
from worker import model_io
from worker.methods import prune_structured as ps
from worker.ops import structured as ops


class _Ctx:
    """Stands in for the pipeline's JobContext: records progress instead of writing rows."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, float]] = []

    def step_progress(self, note: str, fraction: float) -> None:
        self.notes.append((note, fraction))


# ---------------------------------------------------------------------------------------------
# (a) the math on tiny tensors


@pytest.mark.unit
def test_group_norms_rows_columns_bias_and_groups():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    assert ops.group_norms(w, 0, "l2").tolist() == [5.0, 1.0, 2.0, 0.0]
    assert ops.group_norms(w, 0, "l1").tolist() == [7.0, 1.0, 2.0, 0.0]
    assert ops.group_norms(w, 1, "l1").tolist() == [4.0, 6.0]
    # The bias is one more entry of its feature's vector.
    b = torch.tensor([0.0, 0.0, 0.0, 3.0])
    assert ops.group_norms(w, 0, "l2", bias=b).tolist() == [5.0, 1.0, 2.0, 3.0]
    # Groups of consecutive rows: rows {0,1} and {2,3}.
    assert ops.group_norms(w, 0, "l1", group_size=2).tolist() == [8.0, 2.0]
    assert ops.group_norms(w, 0, "l2", group_size=2).tolist() == pytest.approx([26**0.5, 2.0])
    with pytest.raises(ValueError):
        ops.group_norms(w, 0, "l2", group_size=3)
    # Half precision in, float32 scores out.
    assert ops.group_norms(w.half(), 0, "l2").dtype == torch.float32


@pytest.mark.unit
def test_keep_indices_drops_the_lowest_keeps_order_and_breaks_ties_by_index():
    s = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert ops.keep_indices(s, 2).tolist() == [0, 2, 4]
    assert ops.keep_indices(s, 3).tolist() == [0, 2]
    assert ops.keep_indices(torch.ones(4), 2).tolist() == [2, 3]  # ties: lower index goes first
    assert ops.keep_indices(s, 0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        ops.keep_indices(s, 5)


@pytest.mark.unit
def test_expand_groups():
    assert ops.expand_groups(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert ops.expand_groups(ops.expand_groups(torch.tensor([1]), 2), 2).tolist() == [4, 5, 6, 7]


@pytest.mark.unit
def test_linear_pair_loses_the_known_weakest_neurons():
    torch.manual_seed(0)
    fc, proj = nn.Linear(4, 5), nn.Linear(5, 3)
    with torch.no_grad():
        fc.weight[1] *= 0.01  # weak input row (its bias entry counts too)
        fc.bias[1] *= 0.01
        proj.weight[:, 3] *= 0.01  # weak output column
    scores = ops.product_scores([ops.module_norms(fc, "out", "l2"), ops.module_norms(proj, "in", "l2")])
    assert set(torch.argsort(scores)[:2].tolist()) == {1, 3}
    keep = ops.keep_indices(scores, 2)
    assert keep.tolist() == [0, 2, 4]
    fw, fb, pw, pb = fc.weight.clone(), fc.bias.clone(), proj.weight.clone(), proj.bias.clone()
    x = torch.randn(7, 4)
    with torch.no_grad():
        h = torch.relu(fc(x))
        h[:, [1, 3]] = 0
        expect = proj(h)
    ops.shrink(fc, keep, "out")
    ops.shrink(proj, keep, "in")
    assert fc.weight.shape == (3, 4) and fc.out_features == 3 and fc.bias.shape == (3,)
    assert proj.weight.shape == (3, 3) and proj.in_features == 3 and torch.equal(proj.bias, pb)
    assert torch.equal(fc.weight, fw[[0, 2, 4]]) and torch.equal(fc.bias, fb[[0, 2, 4]])
    assert torch.equal(proj.weight, pw[:, [0, 2, 4]])
    assert isinstance(fc.weight, nn.Parameter) and fc.weight.requires_grad
    with torch.no_grad():
        assert torch.allclose(proj(torch.relu(fc(x))), expect, atol=1e-6)


@pytest.mark.unit
def test_conv1d_layout_is_in_out():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    up, down = Conv1D(nf=5, nx=4), Conv1D(nf=3, nx=5)  # weights [4, 5] and [5, 3]
    with torch.no_grad():
        up.bias.normal_()
        up.weight[:, 2] = 0  # neuron 2: a zero input column ...
        up.bias[2] = 0  # ... and bias: its activation is always 0
    assert ops.feature_dim(up, "out") == 1 and ops.feature_dim(down, "in") == 0
    assert ops.features(up, "out") == 5 and ops.features(down, "in") == 5
    norms = ops.module_norms(up, "out", "l1")
    assert norms[2] == 0 and (norms[[0, 1, 3, 4]] > 0).all()
    assert norms.tolist() == pytest.approx((up.weight.abs().sum(0) + up.bias.abs()).tolist())
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        expect = down(torch.relu(up(x)))
    keep = ops.keep_indices(norms, 1)
    assert keep.tolist() == [0, 1, 3, 4]
    w_up, w_down = up.weight.clone(), down.weight.clone()
    ops.shrink(up, keep, "out")
    ops.shrink(down, keep, "in")
    assert up.weight.shape == (4, 4) and up.nf == 4 and up.bias.shape == (4,)
    assert down.weight.shape == (4, 3) and down.nx == 4 and down.bias.shape == (3,)
    assert torch.equal(up.weight, w_up[:, keep]) and torch.equal(down.weight, w_down[keep])
    with torch.no_grad():
        got = down(torch.relu(up(x)))
    assert got.shape == (2, 6, 3) and torch.allclose(got, expect, atol=1e-6)


@pytest.mark.unit
def test_product_scores_zero_factor_wins_and_l1_l2_rank_differently():
    # A spike (l1 = l2 = 3) against a flat row (l2 = 1.6, l1 = 3.2): each norm drops the other.
    w = torch.stack([torch.tensor([3.0, 0, 0, 0]), torch.full((4,), 0.8), torch.full((4,), 5.0)])
    assert ops.keep_indices(ops.group_norms(w, 0, "l2"), 1).tolist() == [0, 2]
    assert ops.keep_indices(ops.group_norms(w, 0, "l1"), 1).tolist() == [1, 2]
    s = ops.product_scores([torch.tensor([1.0, 5.0, 2.0]), torch.tensor([3.0, 0.0, 1.0])])
    assert s.tolist() == [3.0, 0.0, 2.0]
    with pytest.raises(ValueError):
        ops.product_scores([torch.ones(2), torch.ones(3)])


@pytest.mark.unit
def test_shrink_refuses_other_modules_and_bad_indices():
    with pytest.raises(TypeError):
        ops.shrink(nn.Conv2d(2, 2, 1), torch.tensor([0]), "out")
    with pytest.raises(IndexError):
        ops.shrink(nn.Linear(3, 3), torch.tensor([0, 3]), "out")


# ---------------------------------------------------------------------------------------------
# (b) the handler on tiny models, in process

V = 100  # vocabulary


def _config(kind: str, **over):
    import transformers as tf

    llama_like = dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=V,
        max_position_embeddings=32,
    )
    cfgs = {
        "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32),
        "bert": lambda: tf.BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=V,
            max_position_embeddings=32,
        ),
        "roberta": lambda: tf.RobertaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=V,
            max_position_embeddings=40,
            pad_token_id=1,
        ),
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),  # q/k/v carry biases
    }
    cfg = cfgs[kind]()
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


MODEL_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
FFN_WIDTH = {"gpt2": 128, "bert": 64, "roberta": 64, "llama": 96, "mistral": 96, "qwen2": 96}
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def _build(tmp_path: Path, kind: str, seed: int = 0) -> model_io.LoadedModel:
    """Save a random tiny model and load it the way the worker does."""
    import transformers as tf

    torch.manual_seed(seed)
    d = tmp_path / f"{kind}-src"
    getattr(tf, MODEL_CLASS[kind])(_config(kind)).save_pretrained(d)
    return model_io.load(d, "hf")


def _ids() -> torch.Tensor:
    return torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(5))


def _out(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        res = module(input_ids=_ids())
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def _ffn_layers(module: nn.Module, kind: str) -> list[tuple[list[nn.Module], list[nn.Module]]]:
    """(input projections, output projections) of every layer's FFN, by the model's own names."""
    if kind == "gpt2":
        return [([b.mlp.c_fc], [b.mlp.c_proj]) for b in module.transformer.h]
    if kind in ("bert", "roberta"):
        return [([layer.intermediate.dense], [layer.output.dense]) for layer in module.encoder.layer]
    return [([layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]) for layer in module.model.layers]


def _reload(module: nn.Module, kind: str, d: Path) -> nn.Module:
    """save_pretrained, then load with plain transformers' Auto classes."""
    from transformers import AutoModel, AutoModelForCausalLM

    module.save_pretrained(d)
    auto = AutoModel if kind in ("bert", "roberta") else AutoModelForCausalLM
    return auto.from_pretrained(d).eval()


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(MODEL_CLASS))
def test_ffn_pruning_shrinks_every_layer_and_reloads(tmp_path, kind):
    lm = _build(tmp_path, kind)
    n = FFN_WIDTH[kind]
    ctx = _Ctx()
    res = ps.prune_structured(lm, ps_core.PruneStructuredParams(ffn=0.5), ctx)
    m = lm.module
    for ins, outs in _ffn_layers(m, kind):
        for x in ins:
            assert ops.features(x, "out") == n // 2
            assert x.bias is None or x.bias.shape == (n // 2,)
        for x in outs:
            assert ops.features(x, "in") == n // 2
    key = "n_inner" if kind == "gpt2" else "intermediate_size"
    assert getattr(m.config, key) == n // 2
    assert res["ffn"]["neurons_before"] == n and res["ffn"]["neurons_after"] == n // 2
    assert res["ffn"]["per_layer"] and all(
        v == {"before": n, "after": n // 2} for v in res["ffn"]["per_layer"].values()
    )
    assert len(res["ffn"]["per_layer"]) == 2 and res["heads"] is None
    assert res["parameters_after"] == sum(p.numel() for p in m.parameters()) < res["parameters_before"]
    assert [f for _, f in ctx.notes] == [0.5, 1.0]

    y = _out(m)
    assert torch.isfinite(y).all()
    back = _reload(m, kind, tmp_path / "out")
    assert getattr(back.config, key) == n // 2
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert torch.allclose(_out(back), y, atol=1e-5)


def _kill_neurons(module: nn.Module, kind: str, per_layer: list[list[int]]) -> None:
    """Zero the output-projection weights of the given neurons: they then contribute nothing."""
    with torch.no_grad():
        for (_, outs), dead in zip(_ffn_layers(module, kind), per_layer, strict=True):
            for x in outs:
                x.weight.index_fill_(ops.feature_dim(x, "in"), torch.tensor(dead), 0.0)


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(MODEL_CLASS))
def test_dead_neurons_are_the_ones_removed(tmp_path, kind):
    """Neurons with a zero output column score zero, so they go and the outputs do not change;
    a wrong index on either side (e.g. Conv1D's transposed layout) would change them."""
    lm = _build(tmp_path, kind, seed=1)
    n = FFN_WIDTH[kind]
    g = torch.Generator().manual_seed(2)
    dead = [sorted(torch.randperm(n, generator=g)[: n // 4].tolist()) for _ in range(2)]
    assert dead[0] != dead[1]
    _kill_neurons(lm.module, kind, dead)
    expect = _out(lm.module)
    ps.prune_structured(lm, ps_core.PruneStructuredParams(ffn=0.25), _Ctx())
    assert all(ops.features(ins[0], "out") == n - n // 4 for ins, _ in _ffn_layers(lm.module, kind))
    assert torch.allclose(_out(lm.module), expect, atol=1e-5)


def _kill_kv_groups(module: nn.Module, per_layer: list[list[int]]) -> None:
    """Zero the o_proj columns of every query head of the given key-value groups."""
    cfg = module.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Qwen2Config has no field
    with torch.no_grad():
        for layer, dead in zip(module.model.layers, per_layer, strict=True):
            cols = ops.expand_groups(ops.expand_groups(torch.tensor(dead), group), hd)
            layer.self_attn.o_proj.weight[:, cols] = 0


@pytest.mark.integration
@pytest.mark.parametrize("kind", LLAMA_FAMILY)
def test_dead_head_groups_are_removed_with_their_query_heads(tmp_path, kind):
    lm = _build(tmp_path, kind, seed=3)  # 8 query heads, 4 key-value heads, head_dim 8
    # Qwen2's config has no head_dim field: the method must write it, or the reload would
    # derive hidden_size // num_attention_heads = 16.
    assert getattr(lm.module.config, "head_dim", None) == (None if kind == "qwen2" else 8)
    _kill_kv_groups(lm.module, [[1, 3], [0, 2]])
    expect = _out(lm.module)
    res = ps.prune_structured(lm, ps_core.PruneStructuredParams(heads=0.5), _Ctx())
    m = lm.module
    kept = [v["kept_kv_heads"] for v in res["heads"]["per_layer"].values()]
    assert kept == [[0, 2], [1, 3]]
    assert (res["heads"]["heads_before"], res["heads"]["heads_after"]) == (8, 4)
    assert (res["heads"]["kv_heads_before"], res["heads"]["kv_heads_after"]) == (4, 2)
    assert res["ffn"] is None
    cfg = m.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)
    for layer in m.model.layers:
        a = layer.self_attn
        assert a.q_proj.weight.shape == (32, 64) and a.k_proj.weight.shape == (16, 64)
        assert a.v_proj.weight.shape == (16, 64) and a.o_proj.weight.shape == (64, 32)
        if kind == "qwen2":
            assert a.q_proj.bias.shape == (32,) and a.k_proj.bias.shape == (16,) and a.v_proj.bias.shape == (16,)
    y = _out(m)
    assert torch.allclose(y, expect, atol=1e-5)
    back = _reload(m, kind, tmp_path / "out")
    assert (back.config.num_attention_heads, back.config.num_key_value_heads, back.config.head_dim) == (4, 2, 8)
    assert torch.allclose(_out(back), y, atol=1e-5)


@pytest.mark.integration
def test_ffn_and_heads_together_on_llama_bf16(tmp_path):
    lm = _build(tmp_path, "llama")
    lm.module.to(torch.bfloat16)
    res = ps.prune_structured(lm, ps_core.PruneStructuredParams(ffn=0.5, heads=0.5, norm="l1"), _Ctx())
    assert res["norm"] == "l1" and res["ffn"]["neurons_after"] == 48 and res["heads"]["heads_after"] == 4
    assert {p.dtype for p in lm.module.parameters()} == {torch.bfloat16}
    back = _reload(lm.module, "llama", tmp_path / "out")
    assert back.config.intermediate_size == 48 and back.config.num_attention_heads == 4
    assert torch.isfinite(_out(back).float()).all()


@pytest.mark.integration
def test_only_the_requested_part_changes(tmp_path):
    lm = _build(tmp_path, "llama")
    attn = {k: v.clone() for k, v in lm.module.state_dict().items() if "self_attn" in k}
    ps.prune_structured(lm, ps_core.PruneStructuredParams(ffn=0.25), _Ctx())
    sd = lm.module.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in attn.items())
    assert (lm.module.config.num_attention_heads, lm.module.config.num_key_value_heads) == (8, 4)

    lm = _build(tmp_path / "b", "llama")
    mlp = {k: v.clone() for k, v in lm.module.state_dict().items() if ".mlp." in k}
    ps.prune_structured(lm, ps_core.PruneStructuredParams(heads=0.5), _Ctx())
    sd = lm.module.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in mlp.items())
    assert lm.module.config.intermediate_size == 96


@pytest.mark.integration
def test_mistral_takes_head_counts_that_llama_config_refuses(tmp_path):
    """Keeping 3 of 4 groups leaves 6 heads: MistralConfig accepts that, LlamaConfig requires
    hidden_size (64) to be a multiple of num_attention_heads and says which values work."""
    lm = _build(tmp_path, "mistral")
    ps.prune_structured(lm, ps_core.PruneStructuredParams(heads=0.25), _Ctx())
    back = _reload(lm.module, "mistral", tmp_path / "out")
    assert (back.config.num_attention_heads, back.config.num_key_value_heads, back.config.head_dim) == (6, 3, 8)
    assert torch.isfinite(_out(back)).all()

    lm = _build(tmp_path / "l", "llama")
    with pytest.raises(ValueError, match=r"possible 'heads' values: \[0\.5, 0\.75\]"):
        ps.prune_structured(lm, ps_core.PruneStructuredParams(ffn=0.5, heads=0.25), _Ctx())
    # Refused before any change: the FFN half of the request was not applied either.
    assert lm.module.config.intermediate_size == 96
    assert all(layer.mlp.up_proj.weight.shape == (96, 64) for layer in lm.module.model.layers)
    info = ModelInfo(format="hf", architecture="LlamaForCausalLM", config=lm.module.config.to_dict())
    with pytest.raises(ValueError, match="possible 'heads' values"):
        ps_core.check(ps_core.PruneStructuredParams(heads=0.25), info)
    ps_core.check(ps_core.PruneStructuredParams(heads=0.75), info)


@pytest.mark.integration
def test_norm_choice_changes_which_neuron_goes(tmp_path):
    """Neuron 0's input column is one spike (l1 = l2 = 3), neuron 1's is flat (l2 = 2, l1 = 16),
    every other neuron is much larger, and both share the same output row: l2 drops neuron 1,
    l1 drops neuron 0."""
    kept_first = {}
    for norm in ("l1", "l2"):
        lm = _build(tmp_path / norm, "gpt2")
        with torch.no_grad():
            for b in lm.module.transformer.h:
                fc, proj = b.mlp.c_fc, b.mlp.c_proj  # Conv1D: [32, 128] and [128, 32]
                fc.weight.mul_(100)
                fc.bias.zero_()
                fc.weight[:, 0] = 0
                fc.weight[0, 0] = 3.0
                fc.weight[:, 1] = 0.5  # l2 = 0.5 * sqrt(32) ≈ 2.83, l1 = 16
                proj.weight[1] = proj.weight[0]
        res = ps.prune_structured(lm, ps_core.PruneStructuredParams(ffn=1 / 128, norm=norm), _Ctx())
        assert res["ffn"]["removed_per_layer"] == 1
        kept_first[norm] = [b.mlp.c_fc.weight[:, 0].clone() for b in lm.module.transformer.h]
    for col in kept_first["l2"]:
        assert col[0] == 3.0 and (col[1:] == 0).all()  # the spike stayed
    for col in kept_first["l1"]:
        assert (col == 0.5).all()  # the spike went; the flat one is first now


@pytest.mark.unit
def test_params_are_strict():
    assert ps_core.PruneStructuredParams(ffn=0.5).norm == "l2"
    for bad in (
        {},
        {"ffn": 0, "heads": 0},
        {"ffn": 1.0},
        {"heads": -0.1},
        {"ffn": 0.5, "norm": "l3"},
        {"ffn": 0.5, "sparsity": 0.5},
    ):
        with pytest.raises(ValidationError):
            ps_core.PruneStructuredParams.model_validate(bad)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("config", "params", "msg"),
    [
        ({"model_type": "bert", "intermediate_size": 64}, {"heads": 0.5}, "support 'ffn' only"),
        ({"model_type": "gpt2", "n_embd": 64, "n_inner": None}, {"heads": 0.5}, "support 'ffn' only"),
        ({"model_type": "opt", "ffn_dim": 64}, {"ffn": 0.5}, "not 'opt'"),
        ({}, {"ffn": 0.5}, "not None"),
        ({"model_type": "gpt2", "n_embd": 64, "n_inner": None}, {"ffn": 0.001}, "removes none of the 256"),
        ({"model_type": "bert", "intermediate_size": 64}, {"ffn": 0.995}, "would remove all 64"),
        ({"model_type": "bert"}, {"ffn": 0.5}, "no usable 'intermediate_size'"),
        (
            {
                "model_type": "llama",
                "intermediate_size": 64,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
            },
            {"heads": 0.2},
            "removes none of the 2 key-value head groups",
        ),
        (
            {
                "model_type": "llama",
                "intermediate_size": 64,
                "hidden_size": 64,
                "num_attention_heads": 6,
                "num_key_value_heads": 4,
                "head_dim": 16,
            },
            {"heads": 0.5},
            "not a multiple",
        ),
    ],
)
def test_check_refuses(config, params, msg):
    with pytest.raises(ValueError, match=msg):
        ps_core.check(ps_core.PruneStructuredParams(**params), ModelInfo(format="hf", config=config))


@pytest.mark.unit
def test_check_accepts():
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_inner": None}
    ps_core.check(ps_core.PruneStructuredParams(ffn=1 / 256), ModelInfo(format="hf", config=gpt2))  # 4 * n_embd neurons
    llama = {
        "model_type": "llama",
        "intermediate_size": 128,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    ps_core.check(ps_core.PruneStructuredParams(ffn=0.5, heads=0.5), ModelInfo(format="hf", config=llama))


# ---------------------------------------------------------------------------------------------
# (b2) the streaming form (worker/stream): the model is never built, the artifact is the same


# The config fields the method changes: both paths must write them alike.
CHANGED = ("n_inner", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def _stream_case(tmp_path: Path, src: Path, steps: list[tuple[str, dict]]):
    """The in-memory path (handlers + model_io.save) and the streaming engine on the same
    checkpoint: every tensor's bytes equal, the changed config fields equal, and the step
    metrics, parameter counts, sparsity and in-memory size of the result equal."""
    import json

    from core.methods import validate_steps
    from tests.test_stream import _same, _specs, _stream
    from worker import evaluate, pipeline

    validate_steps([{"method": m, "params": p} for m, p in steps])  # a recipe a job may have
    loaded = model_io.load(src, "hf")
    wres = [spec.handler(loaded, params, _Ctx()) for spec, params in _specs(steps)]
    counts = evaluate.parameter_counts(loaded.module, loaded.state)
    sparsity = pipeline._sparsity(loaded, counts)
    memory = loaded.notes.get("memory_bytes") or pipeline._memory_bytes(loaded)
    model_io.save(loaded, tmp_path / "whole", {"modelpress_manifest": 1, "test": True})
    sres = _stream(src, "hf", steps, tmp_path / "stream")

    _same(tmp_path / "whole", tmp_path / "stream")
    ca = json.loads((tmp_path / "whole" / "config.json").read_text())
    cb = json.loads((tmp_path / "stream" / "config.json").read_text())
    for key in (*CHANGED, "quantization_config", "dtype"):
        assert ca.get(key) == cb.get(key), key
    assert sres.step_metrics[0] == wres[0]  # prune.structured's: no float sums, all exact
    assert sres.parameters == counts and sres.sparsity == sparsity
    if all(m != "quantize.cast" for m, _ in steps):
        # (After quantize.cast the in-memory module holds its rotary inv_freq buffer in the new
        # dtype, the stream counts it as transformers loads it, float32: 32 bytes apart on this
        # Llama with or without prune.structured.)
        assert sres.memory_bytes == memory
    return wres, sres, cb


def _qwen2(tmp_path: Path) -> Path:
    """q/k/v with biases: the bias entries go with their rows, v_proj's counts in the score."""
    import transformers as tf

    torch.manual_seed(4)
    d = tmp_path / "qwen2-src"
    tf.Qwen2ForCausalLM(_config("qwen2")).save_pretrained(d)
    return d


STREAM_CASES = [
    ("gpt2", [("prune.structured", {"ffn": 0.5})]),  # Conv1D: c_fc's columns, c_proj's rows
    ("gpt2", [("prune.structured", {"ffn": 0.25, "norm": "l1"})]),
    ("bert", [("prune.structured", {"ffn": 0.5})]),
    ("llama", [("prune.structured", {"ffn": 0.25, "heads": 0.5})]),  # 4 heads over 2 key-value heads
    ("llama", [("prune.structured", {"heads": 0.5})]),
    ("qwen2", [("prune.structured", {"ffn": 0.5, "heads": 0.25})]),  # 8 heads over 4 key-value heads, biases
    # Fused: each tensor read once, shrunk, quantized, written once.
    (
        "llama",
        [("prune.structured", {"ffn": 0.5, "heads": 0.5}), ("quantize.weight_only", {"bits": 4, "group_size": 32})],
    ),
    ("llama", [("prune.structured", {"ffn": 0.5}), ("quantize.cast", {"dtype": "bfloat16"})]),
    # A step before it: the scores must see the weights as that step leaves them (two passes).
    ("llama", [("prune.magnitude", {"sparsity": 0.3, "scope": "layer"}), ("prune.structured", {"ffn": 0.5})]),
]


@pytest.mark.integration
@pytest.mark.parametrize("small_chunks", [False, True], ids=["one-chunk", "3-row-chunks"])
@pytest.mark.parametrize(
    ("model", "steps"), STREAM_CASES, ids=[f"{m}-" + "+".join(f"{s[0]}{s[1]}" for s in st) for m, st in STREAM_CASES]
)
def test_streamed_equals_in_memory(tiny, tmp_path, monkeypatch, model, steps, small_chunks):
    from worker import stream as engine

    if small_chunks:
        # Row chunks of 3 rows (hidden 32 or 64): the kept rows of a chunk are offsets from its
        # first row, and many chunks keep none of theirs.
        monkeypatch.setattr(engine, "CHUNK_BYTES", 1000)
    src = _qwen2(tmp_path) if model == "qwen2" else tiny[model]
    _, sres, cfg = _stream_case(tmp_path, src, steps)
    metrics = sres.step_metrics[[m for m, _ in steps].index("prune.structured")]
    assert metrics["parameters_after"] < metrics["parameters_before"]
    if model == "gpt2":
        assert cfg["n_inner"] == metrics["ffn"]["neurons_after"] and metrics["ffn"]["neurons_before"] == 256
    if "heads" in steps[0][1]:
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
            metrics["heads"]["heads_after"],
            metrics["heads"]["kv_heads_after"],
        )


@pytest.mark.integration
def test_streamed_step_is_chosen_and_reads_no_weight_twice(tiny, tmp_path):
    """The registry gives the method a streaming form (so a job of data-free steps with it takes
    the stream path), and its pre-pass reads only the weights it scores, once each."""
    from worker import methods, shards
    from worker import stream as engine
    from worker.sinks import ZipSink

    spec = methods.get("prune.structured")
    assert spec.stream is not None
    reads: list[str] = []
    orig = shards.ShardReader.tensor
    sink = ZipSink(tmp_path / "a.zip")
    try:
        shards.ShardReader.tensor = lambda self, name: (reads.append(name), orig(self, name))[1]
        engine.run(
            tiny["llama"],
            "hf",
            [spec.stream(spec.params.model_validate({"heads": 0.5}), None)],
            sink,
            extra_files=[],
            manifest={},
        )
    finally:
        shards.ShardReader.tensor = orig
        sink.abort()
    scored = {n for n in reads if reads.count(n) == 2}
    # v_proj and o_proj are read by the pre-pass and again by the pass that writes them; q_proj
    # and k_proj, shrunk but not scored, only by the writing pass.
    assert scored == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "vo"}
    assert all(reads.count(n) == 1 for n in reads if n not in scored)


@pytest.mark.integration
def test_streamed_refusals_and_fallback(tiny, tmp_path):
    """The plan's checks refuse as the in-memory handler does (before anything is written); a
    checkpoint the streaming form cannot express (a bias the module has, missing from the
    shards) raises NotStreamable, so the job runs in memory instead."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from worker import methods
    from worker import stream as engine
    from worker.sinks import ZipSink

    spec = methods.get("prune.structured")

    def run(src: Path, params: dict) -> None:
        sink = ZipSink(tmp_path / "out.zip")
        try:
            engine.run(
                src, "hf", [spec.stream(spec.params.model_validate(params), None)], sink, extra_files=[], manifest={}
            )
        finally:
            sink.abort()
        assert not (tmp_path / "out.zip").exists()

    llama8 = tmp_path / "llama8"
    tf.LlamaForCausalLM(_config("llama")).save_pretrained(llama8)  # 8 heads over 4 groups, hidden 64
    with pytest.raises(ValueError, match=r"possible 'heads' values: \[0\.5, 0\.75\]"):
        run(llama8, {"ffn": 0.5, "heads": 0.25})
    with pytest.raises(
        engine.NotStreamable, match=r"transformer\.h\.0\.mlp\.c_fc\.bias is not a tensor of the checkpoint"
    ):
        no_bias = tmp_path / "gpt2-no-bias"
        no_bias.mkdir()
        for p in tiny["gpt2"].iterdir():
            (no_bias / p.name).write_bytes(p.read_bytes())
        sd = load_file(str(no_bias / "model.safetensors"))
        del sd["transformer.h.0.mlp.c_fc.bias"]
        save_file(sd, str(no_bias / "model.safetensors"), metadata={"format": "pt"})
        run(no_bias, {"ffn": 0.5})


# ---------------------------------------------------------------------------------------------
# (c) through the API: real processes


def _unzip(data: bytes, dest: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert {"config.json", "model.safetensors", "modelpress.json"} <= set(zf.namelist())
        zf.extractall(dest)
    return dest


@pytest.mark.integration
@pytest.mark.parametrize(
    ("model", "params"),
    [("gpt2", {"ffn": 0.5}), ("bert", {"ffn": 0.5}), ("llama", {"ffn": 0.5}), ("llama", {"heads": 0.5})],
)
def test_api_round_trip(stack, tiny, tmp_path, model, params):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from tests.test_e2e import load_artifact

    c = stack.client()
    r = upload_dir(c, tiny[model])
    assert r.status_code == 201, r.text
    m = r.json()
    r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": [{"method": "prune.structured", "params": params}]})
    assert r.status_code == 202, r.text
    assert r.json()["steps"][0]["params"] == {"ffn": 0.0, "heads": 0.0, "norm": "l2", **params}
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    # Data-free: the worker streams the checkpoint rather than building the model.
    assert job["metrics"]["engine"]["path"] == "stream"
    step = job["metrics"]["steps"][0]
    assert step["method"] == "prune.structured"
    assert step["parameters_after"] < step["parameters_before"] == m["parameters"]
    assert job["metrics"]["size"]["artifact_bytes"] < m["size_bytes"]

    data = c.get(f"/v1/jobs/{job['id']}/artifact").content
    # A fresh interpreter that never imports modelpress loads it with AutoModel (GPT-2 only: slow).
    stats = load_artifact(data, tmp_path / "check", isolated=model == "gpt2")
    assert stats["model_type"] == model
    d = _unzip(data, tmp_path / "out")
    cfg = AutoConfig.from_pretrained(d)
    auto = AutoModel if model == "bert" else AutoModelForCausalLM
    back = auto.from_pretrained(d).eval()
    assert sum(p.numel() for p in back.parameters()) == step["parameters_after"]
    if model == "gpt2":
        assert cfg.n_inner == 128 and step["ffn"]["neurons_before"] == 256
        assert all(
            b.mlp.c_fc.weight.shape == (64, 128) and b.mlp.c_proj.weight.shape == (128, 64) for b in back.transformer.h
        )
    elif model == "bert":
        assert cfg.intermediate_size == 64
        assert all(
            layer.intermediate.dense.weight.shape == (64, 64) and layer.output.dense.weight.shape == (64, 64)
            for layer in back.encoder.layer
        )
    elif "ffn" in params:
        assert cfg.intermediate_size == 64 and (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
        assert all(
            layer.mlp.up_proj.weight.shape == (64, 64) and layer.mlp.down_proj.weight.shape == (64, 64)
            for layer in back.model.layers
        )
    else:
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
            2,
            1,
            16,
            128,
        )
        assert (step["heads"]["heads_before"], step["heads"]["heads_after"]) == (4, 2)
        for layer in back.model.layers:
            a = layer.self_attn
            assert (a.q_proj.weight.shape, a.k_proj.weight.shape, a.o_proj.weight.shape) == (
                (32, 64),
                (16, 64),
                (64, 32),
            )
    with torch.no_grad():
        out = back(input_ids=torch.randint(0, 500, (1, 9)))
    assert torch.isfinite(out.logits if hasattr(out, "logits") else out.last_hidden_state).all()


def _save(tmp_path: Path, name: str, model: nn.Module) -> Path:
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.integration
def test_api_refusals_at_submit(stack, tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    c = stack.client()
    ids = {k: upload_dir(c, tiny[k]).json()["id"] for k in ("bert", "gpt2", "llama")}
    bare = c.post("/v1/models", files=[("files", (tiny["bare"].name, tiny["bare"].read_bytes()))])
    assert bare.status_code == 201, bare.text
    ids["bare"] = bare.json()["id"]
    opt = _save(
        tmp_path,
        "opt",
        OPTForCausalLM(
            OPTConfig(
                hidden_size=32,
                num_hidden_layers=1,
                ffn_dim=64,
                num_attention_heads=2,
                vocab_size=100,
                max_position_embeddings=32,
                word_embed_proj_dim=32,
            )
        ),
    )
    ids["opt"] = upload_dir(c, opt).json()["id"]
    llama8 = _save(
        tmp_path,
        "llama8",
        LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=1,
                hidden_size=64,
                intermediate_size=64,
                num_attention_heads=8,
                num_key_value_heads=4,
                vocab_size=100,
                max_position_embeddings=32,
            )
        ),
    )
    ids["llama8"] = upload_dir(c, llama8).json()["id"]

    at = ["body", "steps", 0]
    cases = [
        ("bert", {"heads": 0.5}, [*at, "params"], "unsupported_model", "support 'ffn' only"),
        ("gpt2", {"ffn": 0.5, "heads": 0.5}, [*at, "params"], "unsupported_model", "support 'ffn' only"),
        ("bare", {"ffn": 0.5}, [*at, "method"], "unsupported_model", "does not support 'safetensors'"),
        ("opt", {"ffn": 0.5}, [*at, "params"], "unsupported_model", "not 'opt'"),
        ("llama", {"heads": 0.2}, [*at, "params"], "unsupported_model", "removes none"),
        ("llama8", {"heads": 0.25}, [*at, "params"], "unsupported_model", "possible 'heads' values: [0.5, 0.75]"),
        ("gpt2", {"ffn": 0.5, "sparsity": 0.5}, [*at, "params", "sparsity"], "extra_forbidden", ""),
        ("gpt2", {"ffn": 1.0}, [*at, "params", "ffn"], "less_than", ""),
        ("gpt2", {"ffn": 0.5, "norm": "l3"}, [*at, "params", "norm"], "literal_error", ""),
        ("gpt2", {}, [*at, "params"], "value_error", "nothing would be removed"),
    ]
    for model, params, loc, typ, msg in cases:
        r = c.post(
            "/v1/jobs", json={"model_id": ids[model], "steps": [{"method": "prune.structured", "params": params}]}
        )
        assert r.status_code == 422, (model, params, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        errs = r.json()["errors"]
        assert [e["loc"] for e in errs] == [loc], (model, params, errs)
        assert errs[0]["type"] == typ and msg in errs[0]["msg"], (model, params, errs)
    # The llama8 model accepts the fractions the refusal offers.
    r = c.post(
        "/v1/jobs",
        json={"model_id": ids["llama8"], "steps": [{"method": "prune.structured", "params": {"heads": 0.75}}]},
    )
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["metrics"]["steps"][0]["heads"]["heads_after"] == 2


@pytest.mark.integration
def test_method_is_listed(cluster):
    methods = {m["name"]: m for m in cluster.client().get("/v1/methods").json()}
    schema = methods["prune.structured"]["params_schema"]
    assert set(schema["properties"]) == {"ffn", "heads", "norm"}
    assert schema.get("additionalProperties") is False
