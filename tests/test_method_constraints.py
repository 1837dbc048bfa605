"""Method constraints told up front (issue 18, item 8): each method declares its limits in its own
file (``MethodConstraint``), ``GET /v1/methods`` and docs/METHODS.md list them, and a group size
that does not divide every Linear input width is refused naming the blocking layers and the group
sizes that would work. Pure Python on shapes: no model, no server."""

from __future__ import annotations

import io
import json
import pickle
import struct
from dataclasses import dataclass
from typing import get_args

import pytest

from core.jobs import plan
from core.methods import MethodSpec, ModelInfo, StepError, _ct, _doc, load_all, validate_steps
from core.methods.quantize_weight_only import QuantizeWeightOnlyParams

pytestmark = pytest.mark.unit

LLAMA = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536}
TOKENIZER = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class Header:
    name: str
    dtype: str
    shape: tuple[int, ...]


def _refused(step: dict, info: ModelInfo, has_dataset: bool = True) -> dict:
    with pytest.raises(StepError) as e:
        validate_steps([step], info, has_dataset=has_dataset)
    assert len(e.value.errors) == 1, e.value.errors
    return e.value.errors[0]


def test_groups_of_128_on_a_width_of_576_are_accepted_the_layers_fall_back() -> None:
    # The default: layers 128 does not divide get a group size of their own in the worker.
    info = ModelInfo("hf", "LlamaForCausalLM", LLAMA, TOKENIZER, _doc.smollm_like)
    for method, params in (("quantize.weight_only", {"bits": 4, "group_size": 128}), ("quantize.gptq", {})):
        assert validate_steps([{"method": method, "params": params}], info)[0]["params"].get("strict_group_size") in (
            None,
            False,
        )
    assert _ct.group_fallbacks(128, {"q": 576, "down": 1536, "odd": 1000, "w": 2880}) == {
        "q": 64,
        "odd": None,
        "w": 64,
    }
    assert _ct.group_fallbacks(64, {"a": 96, "b": 100}) == {"a": 32, "b": None}
    assert _ct.group_fallbacks(32, {"a": 48}) == {"a": None}  # no accepted size below 32
    assert _ct.group_fallbacks(None, {"a": 48}) == {}
    assert _ct.describe_fallbacks({"b": None, "a": 64}) == {"a": 64, "b": "channel"}


def test_strict_groups_of_128_on_a_width_of_576_name_the_layers_and_the_sizes_that_work() -> None:
    info = ModelInfo("hf", "LlamaForCausalLM", LLAMA, TOKENIZER, _doc.smollm_like)
    step = {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128, "strict_group_size": True}}
    err = _refused(step, info)
    assert err["loc"] == ["body", "steps", 0, "params", "group_size"]
    assert err["type"] == "unsupported_model" and err["constraint"] == "group_divides_inputs"
    # 30 layers x q, k, v, o, gate, up read the 576-wide hidden state; down_proj reads 1536 = 12 x 128.
    assert err["blocking_count"] == 180 and len(err["blocking_layers"]) == _ct.MAX_LISTED
    assert err["blocking_layers"][0] == {"name": "model.layers.0.self_attn.q_proj", "in_features": 576}
    assert not any("down_proj" in b["name"] for b in err["blocking_layers"])
    assert err["valid_group_sizes"] == [32, 64] and err["group_size"] == 128
    msg = err["msg"]
    assert "group_size 128 does not divide the input width of 180 Linear layers" in msg
    assert "model.layers.0.self_attn.q_proj: 576" in msg and "and 177 more" in msg
    assert "divide every input width: 32, 64; or null" in msg
    # What the refusal offers works, and so does one scale per channel.
    for group in (64, None):
        step = {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": group}}
        assert validate_steps([step], info)[0]["params"]["group_size"] == group


def test_the_shapes_come_from_the_safetensors_headers_as_the_api_reads_them() -> None:
    # What the API hands the check (app/jobs/service.py): plan.read_header of each stored file.
    header = {
        "__metadata__": {"format": "pt"},
        "model.embed_tokens.weight": {"dtype": "F16", "shape": [100, 576], "data_offsets": [0, 0]},
        "model.layers.0.mlp.down_proj.weight": {"dtype": "F16", "shape": [576, 1536], "data_offsets": [0, 0]},
        "model.layers.0.mlp.up_proj.weight": {"dtype": "F16", "shape": [1536, 576], "data_offsets": [0, 0]},
        "model.norm.weight": {"dtype": "F16", "shape": [576], "data_offsets": [0, 0]},
    }
    raw = json.dumps(header).encode()
    tensors = plan.read_header(io.BytesIO(struct.pack("<Q", len(raw)) + raw), 1 << 20)
    info = ModelInfo("hf", "LlamaForCausalLM", LLAMA, TOKENIZER, lambda: tensors)
    assert _ct.linear_inputs(info) == {"model.layers.0.mlp.down_proj": 1536, "model.layers.0.mlp.up_proj": 576}
    strict = {"bits": 8, "group_size": 128, "strict_group_size": True}
    err = _refused({"method": "quantize.weight_only", "params": strict}, info)
    assert err["blocking_layers"] == [{"name": "model.layers.0.mlp.up_proj", "in_features": 576}]
    assert "1 Linear layer (width 576: model.layers.0.mlp.up_proj: 576)" in err["msg"]


def test_when_no_accepted_size_divides_only_per_channel_is_offered() -> None:
    refusal = _ct.group_refusal("quantize.weight_only", 32, {"a": 1000, "b": 96})
    assert refusal is not None and refusal.fields["valid_group_sizes"] == []
    assert refusal.fields["blocking_layers"] == [{"name": "a", "in_features": 1000}]
    assert "None of 32, 64, 128 divides every input width: use null" in str(refusal)
    # A worker's refusal survives pickling (a pool process hands it back) with its facts.
    again = pickle.loads(pickle.dumps(refusal))  # safe: bytes this test pickled itself, no upload
    assert (str(again), again.constraint, again.fields) == (str(refusal), refusal.constraint, refusal.fields)
    assert _ct.group_refusal("quantize.weight_only", 32, {"a": 96, "b": 1024}) is None


def test_without_readable_headers_the_config_widths_are_checked() -> None:
    def unreadable() -> list[Header]:
        raise OSError("storage is down")

    for tensors in (None, unreadable):
        info = ModelInfo("hf", "LlamaForCausalLM", {**LLAMA, "num_attention_heads": 9, "head_dim": 64}, (), tensors)
        strict = {"bits": 4, "group_size": 128, "strict_group_size": True}
        err = _refused({"method": "quantize.weight_only", "params": strict}, info)
        assert err["blocking_config"] == {"hidden_size": 576, "num_attention_heads * head_dim": 576}
        assert err["valid_group_sizes"] == [32, 64] and "blocking_layers" not in err
        assert "does not divide the model's hidden_size (576)" in err["msg"]


def test_calibrated_quantizers_check_their_default_group_and_leave_ignored_layers_out() -> None:
    info = ModelInfo("hf", "LlamaForCausalLM", LLAMA, TOKENIZER, _doc.smollm_like)
    # W4A16 groups 128 columns when group_size is left out.
    err = _refused({"method": "quantize.gptq", "params": {"strict_group_size": True}}, info)
    assert err["constraint"] == "group_divides_inputs" and err["blocking_count"] == 180
    # Layers left in float do not block it.
    ignore = ["lm_head", "re:(q|k|v|o|gate|up)_proj$"]
    assert validate_steps([{"method": "quantize.gptq", "params": {"ignore": ignore, "strict_group_size": True}}], info)
    err = _refused({"method": "quantize.gptq", "params": {"scheme": "W8A8", "group_size": 32}}, info)
    assert err["constraint"] == "w8a8_per_channel" and err["loc"][-1] == "group_size"


def test_other_refusals_name_their_constraint() -> None:
    gpt2 = ModelInfo("hf", "GPT2LMHeadModel", {"model_type": "gpt2"}, TOKENIZER)
    assert _refused({"method": "quantize.dynamic_int8"}, gpt2)["constraint"] == "linear_layers_only"
    quantized = ModelInfo("hf", "LlamaForCausalLM", {**LLAMA, "quantization_config": {}}, TOKENIZER)
    assert _refused({"method": "quantize.fixed_point", "params": {"frac_bits": 6}}, quantized)["constraint"] == (
        "not_quantized"
    )
    bare = ModelInfo("safetensors")
    assert _refused({"method": "quantize.weight_only", "params": {"bits": 8}}, bare)["constraint"] == "model_format"
    llama = ModelInfo("hf", "LlamaForCausalLM", LLAMA, ("config.json",))
    assert _refused({"method": "prune.wanda", "params": {"sparsity": 0.5}}, llama)["constraint"] == (
        "tokenizer_required"
    )
    assert _refused({"method": "prune.wanda", "params": {"sparsity": 0.5}}, llama, False)["constraint"] == (
        "dataset_required"
    )
    bert = ModelInfo("hf", "BertModel", {"model_type": "bert"}, TOKENIZER)
    assert _refused({"method": "quantize.awq"}, bert)["constraint"] == "architectures"


def _declared(spec: MethodSpec) -> None:
    ids = [c.id for c in spec.constraints()]
    assert len(ids) == len(set(ids)), (spec.name, ids)
    fields = set(spec.params.model_fields)
    for c in spec.constraints():
        assert c.rule.strip() and c.id.isidentifier(), (spec.name, c)
        assert set(c.params) <= fields, (spec.name, c.id, set(c.params) - fields)


def test_every_method_declares_its_limits_on_its_own_parameters() -> None:
    registry = load_all()
    for spec in registry.values():
        _declared(spec)
        out = spec.describe()
        assert [c["id"] for c in out["constraints"]] == [c.id for c in spec.constraints()]
        # The registry's flags are told as constraints too.
        ids = {c["id"] for c in out["constraints"]}
        needs_data = spec.needs_data or spec.needs_data_when is not None
        assert ("dataset_required" in ids) == needs_data and ("gpu_only" in ids) == spec.needs_gpu
        assert ("last_step" in ids) == spec.final and ("model_format" in ids) == (spec.formats == {"hf"})
    for name in ("quantize.weight_only", "quantize.gptq", "quantize.awq"):
        assert "group_divides_inputs" in {c.id for c in registry[name].constraints()}, name


def test_the_declared_group_sizes_and_layer_patterns_are_the_ones_used() -> None:
    annotation = QuantizeWeightOnlyParams.model_fields["group_size"].annotation
    assert tuple(get_args(get_args(annotation)[0])) == _ct.GROUP_SIZES
    assert set(plan._EMBEDDING_PATTERNS) <= set(_ct.NOT_LINEAR_PATTERNS)
    t5 = [Header("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "F32", (32, 8))]
    assert _ct.linear_inputs(ModelInfo("hf", tensors=lambda: t5)) == {}
    gptq = load_all()["quantize.gptq"].params
    for g in (16, 96, 192):
        with pytest.raises(ValueError, match="group_size must be 32, 64, 128 or null"):
            gptq.model_validate({"group_size": g})


def test_the_methods_doc_is_generated_from_the_registry() -> None:
    text = _doc.DOC.read_text()
    assert text == _doc.render(), "docs/METHODS.md is stale: run `python -m core.methods._doc`"
    for spec in load_all().values():
        section = text.split(f"## `{spec.name}`\n", 1)[1].split("\n## ", 1)[0]
        for c in spec.constraints():
            assert f"| `{c.id}` |" in section, (spec.name, c.id)
