"""The job spec's ``output`` (core/exports): its schema, ``auto``'s GGUF type, the plan's export
stage, and the CLI's ``--export``, without a server."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from core import exports
from core.jobs.schemas import JobIn

pytestmark = pytest.mark.unit

W4G32 = [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}}]
PLAN = {
    "parameters": 1_000_000,
    "artifact_bytes": 2_000_000,
    "scratch_bytes": 4_000_000,
    "peak_memory_bytes": 500_000_000,
    "baseline_bytes": 450_000_000,
    "largest_tensor_bytes": 4_000_000,
    "seconds": 2.0,
    "notes": ["stream"],
}


def test_output_schema_is_strict_and_defaults_to_safetensors():
    job = JobIn.model_validate({"model_id": "m", "steps": W4G32})
    assert job.output.model_dump() == {"format": "safetensors"}
    adapter = TypeAdapter(exports.OutputIn)
    assert adapter.validate_python({"format": "gguf"}).model_dump() == {"format": "gguf", "type": "auto"}
    assert adapter.validate_python({"format": "onnx"}).model_dump() == {
        "format": "onnx",
        "quantize": None,
        "reduce_range": True,
    }
    for bad in ({"format": "gguf", "type": "q4_0"}, {"format": "onnx", "type": "F16"}, {"format": "tflite"}, {}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


def test_auto_type_is_the_exact_one_or_sixteen_bits():
    assert exports.resolve_gguf_type(W4G32, {"torch_dtype": "float32"}) == "Q4_0"
    w8 = [{"method": "quantize.weight_only", "params": {"bits": 8, "group_size": None}}]
    assert exports.resolve_gguf_type(w8, {}) == "Q8_0"
    asym = [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32, "symmetric": False}}]
    assert exports.resolve_gguf_type(asym, {"torch_dtype": "bfloat16"}) == "BF16"
    prune = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]
    assert exports.resolve_gguf_type(prune, {"torch_dtype": "float32"}) == "F16"
    # A quantization followed by another step is not what the file holds any more.
    assert exports.resolve_gguf_type([*W4G32, *prune], {}) == "F16"


def test_plan_counts_the_export_stage():
    assert exports.with_export(PLAN, {"format": "safetensors"}, W4G32, {}) is PLAN
    g = exports.with_export(PLAN, {"format": "gguf", "type": "auto"}, W4G32, {})
    assert g["artifact_bytes"] == int(1_000_000 * 18 / 32)  # Q4_0: 18 bytes a block of 32
    assert g["scratch_bytes"] == PLAN["scratch_bytes"] + PLAN["artifact_bytes"] + 2 * g["artifact_bytes"]
    assert g["seconds"] > PLAN["seconds"]
    assert g["peak_memory_bytes"] == PLAN["peak_memory_bytes"]  # three 4 MB tensors fit under the peak
    assert "export: GGUF Q4_0" in g["notes"][-1] and PLAN["notes"] == ["stream"]
    big = {**PLAN, "parameters": 100_000_000}
    o = exports.with_export(big, {"format": "onnx", "quantize": None}, W4G32, {})
    assert o["artifact_bytes"] == 400_000_000
    assert o["peak_memory_bytes"] == PLAN["baseline_bytes"] + 2 * 400_000_000  # traced whole in float32
    q = exports.with_export(big, {"format": "onnx", "quantize": "int8_dynamic"}, W4G32, {})
    assert q["artifact_bytes"] == 100_000_000


def test_cli_export_flag_parses_to_the_output():
    from modelpress._cli import parse_export

    assert parse_export("gguf") == {"format": "gguf"}
    assert parse_export("gguf:type=Q4_0") == {"format": "gguf", "type": "Q4_0"}
    assert parse_export("onnx:quantize=int8_dynamic") == {"format": "onnx", "quantize": "int8_dynamic"}
    assert parse_export('{"format": "onnx", "quantize": null}') == {"format": "onnx", "quantize": None}
    for bad in ("gguf:type", "{}", "{not json", "a b"):
        with pytest.raises(ValueError, match="--export"):
            parse_export(bad)
