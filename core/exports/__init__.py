"""Output formats of a job's artifact: the ``output`` of a job spec.

``safetensors`` (the default) is the steps' own result: compressed-tensors safetensors that
transformers and vLLM load. ``gguf`` (llama.cpp) and ``onnx`` (ONNX Runtime) convert that result
once the steps have run (worker/export), so a user who deploys with one of those runtimes gets a
file it runs natively. What a format cannot express is refused at submit (``refusals``), from the
model's config and safetensors headers alone: this package is imported by the API and never
imports torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(extra="forbid", strict=True)

GgufType = Literal["auto", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M"]
OnnxQuantize = Literal["int8_dynamic", "int8_static"]


class SafetensorsOutput(BaseModel):
    """The steps' result as compressed-tensors safetensors (transformers, vLLM)."""

    model_config = STRICT
    format: Literal["safetensors"] = "safetensors"


class GgufOutput(BaseModel):
    """One GGUF file for llama.cpp, with the tokenizer and chat template in its metadata."""

    model_config = STRICT
    format: Literal["gguf"]
    type: GgufType = Field(
        default="auto",
        description="tensor type of the weights. auto: Q8_0 or Q4_0 when the steps quantized symmetric 8- or "
        "4-bit in groups of 32 (exported exactly, no second rounding), else F16 (BF16 for a bfloat16 model)",
    )


class OnnxOutput(BaseModel):
    """An ONNX model for ONNX Runtime (a decoder with its KV cache, or an encoder)."""

    model_config = STRICT
    format: Literal["onnx"]
    quantize: OnnxQuantize | None = Field(
        default=None,
        description="int8 by ONNX Runtime's quantizer: int8_dynamic (per-channel weights, activations "
        "quantized at run time) or int8_static (QDQ, calibrated on the job's dataset_id); null: float32",
    )
    reduce_range: bool = Field(
        default=True,
        description="int8 only: weights in 7 bits (-64..64, symmetric) instead of 8, so that no x86 CPU's "
        "int8 kernel can saturate (without VNNI, ONNX Runtime multiplies uint8 activations by int8 weights in "
        "16-bit pairs, which overflow at 8 bits: logit errors of ~19 % of the largest measured on an AVX2 "
        "machine against 1.5 % with VNNI). false: full 8-bit weights, for CPUs with VNNI (AVX512-VNNI, "
        "AVX-VNNI) or ARM only",
    )


OutputIn = Annotated[SafetensorsOutput | GgufOutput | OnnxOutput, Field(discriminator="format")]
FORMATS = ("safetensors", "gguf", "onnx")


def default_output() -> dict[str, Any]:
    return SafetensorsOutput().model_dump()


def _tensor_map(info: Any) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) from the model's headers (empty when unknown)."""
    if info.tensors is None:
        return {}
    try:
        return {t.name: (t.dtype, list(t.shape)) for t in info.tensors()}
    except (OSError, ValueError):
        return {}  # the format's config checks still run; the worker checks shapes again


def refusals(output: dict[str, Any], info: Any, steps: list[dict[str, Any]], has_dataset: bool) -> list[str]:
    """Why the model (``info``: core.methods.ModelInfo) cannot be written in ``output``'s format
    after ``steps``; empty when it can. Each format's module knows its families and shapes."""
    fmt = output.get("format", "safetensors")
    if fmt == "safetensors":
        return []
    if info.format != "hf" or not info.config:
        return [
            f"a {fmt} export needs a Hugging Face model folder (config.json and a tokenizer): "
            "a bare safetensors state dict has no architecture to export"
        ]
    if any(s.get("method") == "transform.rotate" and (s.get("params") or {}).get("style") == "quip" for s in steps):
        return [
            f"transform.rotate style quip leaves online rotations that run at inference (compressed-tensors "
            f"transform_config), which a {fmt} file cannot express; use style spinquant (rotations fused into "
            "the weights) or the safetensors output"
        ]
    if fmt == "gguf":
        from core.exports import gguf
        from core.methods import has_tokenizer

        gguf_type = output.get("type", "auto")
        if gguf_type == "auto":
            gguf_type = resolve_gguf_type(steps, info.config)
        reasons = list(gguf.refusals(info.config, _tensor_map(info), gguf_type))
        if not has_tokenizer(list(info.files)):
            reasons.append(
                "a GGUF file carries the model's tokenizer, and the upload has none (tokenizer.json, or "
                "vocab.json + merges.txt)"
            )
        return reasons
    from core.exports import onnx

    return list(onnx.refusals(info.config, _tensor_map(info), output.get("quantize"), has_dataset))


# Runtimes a worker may or may not have (module name -> the pip package that installs it). Workers
# publish which they have (worker/registry.py, the ``workers.runtimes`` column).
OPTIONAL_RUNTIMES = {"llama_cpp": "llama-cpp-python", "onnxruntime": "onnxruntime"}


def required_runtime(output: dict[str, Any], steps: list[dict[str, Any]], config: dict[str, Any] | None) -> str | None:
    """The optional runtime (an ``OPTIONAL_RUNTIMES`` key) without which the export cannot be
    made at all, or None. Q4_K_M is written by llama.cpp's own quantizer (gguf-py has no K-quant
    encoder); every other type is written by gguf-py or torch's exporter, and a missing runtime
    then only leaves the export unmeasured in it (the report says so)."""
    if output.get("format") != "gguf":
        return None
    gguf_type = output.get("type", "auto")
    if gguf_type == "auto":
        gguf_type = resolve_gguf_type(steps, config)
    return "llama_cpp" if gguf_type == "Q4_K_M" else None


def resolve_gguf_type(steps: list[dict[str, Any]], config: dict[str, Any] | None) -> str:
    """``type: auto``: the GGUF type that holds the steps' quantization exactly, else 16-bit
    floats in the model's own kind (BF16 for a bfloat16 model, F16 otherwise)."""
    from core.exports import gguf

    exact = gguf.exact_type(steps)
    if exact is not None:
        return exact
    dtype = str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "")
    return "BF16" if dtype == "bfloat16" else "F16"


# Bytes per weight of each GGUF type as llama.cpp stores it: blocks of 32 (Q8_0: 32 int8 + an fp16
# scale = 34 bytes; Q4_0: 16 + 2 = 18) or 256 (Q4_K_M mixes Q4_K, 144 bytes, with Q6_K for some
# tensors: ~4.85 bits a weight on Llama models, llama.cpp's own figure).
GGUF_BYTES_PER_WEIGHT = {"F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32, "Q4_K_M": 4.85 / 8}
# ONNX: float32 weights, or int8 MatMul weights (ONNX Runtime's quantizer leaves embeddings and
# norms float: counted at 4 bytes when the plan cannot tell them apart, so an upper bound).
ONNX_BYTES_PER_WEIGHT = {None: 4.0, "int8_dynamic": 1.0, "int8_static": 1.0}
# Conversion speed assumed by the plan until workers measure their own: bytes of output a second.
EXPORT_BYTES_PER_S = 100e6


def with_export(
    plan: dict[str, Any], output: dict[str, Any], steps: list[dict[str, Any]], config: dict[str, Any] | None
) -> dict[str, Any]:
    """``plan`` (core/jobs/plan.compute's) with the export stage counted: the artifact is the
    export's, the scratch holds the steps' result unpacked beside the export, memory grows by what
    the converter holds (GGUF: one tensor at a time; ONNX: the model traced whole in float32) and
    the seconds by the conversion."""
    fmt = output.get("format", "safetensors")
    if fmt == "safetensors":
        return plan
    params = int(plan.get("parameters") or 0)
    if fmt == "gguf":
        gguf_type = output.get("type", "auto")
        if gguf_type == "auto":
            gguf_type = resolve_gguf_type(steps, config)
        export_bytes = int(params * GGUF_BYTES_PER_WEIGHT.get(gguf_type, 2.0))
        held = 3 * int(plan.get("largest_tensor_bytes") or 0)  # a tensor in float32, its blocks, a copy
        how = f"GGUF {gguf_type}: ~{GGUF_BYTES_PER_WEIGHT.get(gguf_type, 2.0):.3f} bytes a weight, tensor by tensor"
    else:
        quantize = output.get("quantize")
        export_bytes = int(params * ONNX_BYTES_PER_WEIGHT.get(quantize, 4.0))
        # The exporter traces the model whole in float32, and the quantizer reads the float file.
        held = 2 * params * 4
        how = f"ONNX {'float32' if quantize is None else quantize}: the model traced whole in float32"
    plan = dict(plan)
    steps_artifact = int(plan.get("artifact_bytes") or 0)
    plan["artifact_bytes"] = export_bytes
    plan["scratch_bytes"] = int(plan.get("scratch_bytes") or 0) + steps_artifact + 2 * export_bytes
    converter_peak = int(plan.get("baseline_bytes") or 0) + held
    plan["peak_memory_bytes"] = max(int(plan.get("peak_memory_bytes") or 0), converter_peak)
    plan["seconds"] = float(plan.get("seconds") or 0.0) + export_bytes / EXPORT_BYTES_PER_S
    plan["notes"] = [
        *plan.get("notes", []),
        f"export: {how}; its figures are estimates from the format's bytes per weight, not yet measured by workers",
    ]
    return plan
