"""ONNX output: which models the exporter takes, and why it refuses the others (pure python).

The worker's exporter (``worker/export/onnx.py``) writes, with PyTorch's own exporter
(``torch.onnx.export``, dynamo), a ``model.onnx`` that ONNX Runtime runs:

* causal LMs (:data:`MODEL_TYPES` task ``text-generation-with-past``) as one decoder with a KV
  cache, named as optimum's ONNX decoders are: inputs ``input_ids``, ``attention_mask``,
  ``position_ids``, ``past_key_values.{i}.key`` / ``.value``; outputs ``logits``,
  ``present.{i}.key`` / ``.value``. The first step feeds an empty past (length 0);
* encoders (``feature-extraction``): ``input_ids``, ``attention_mask`` (and ``token_type_ids``
  where the model has token types) -> ``last_hidden_state``; a sequence-classification head
  (``text-classification``) adds ``logits``.

Quantization (:data:`ONNX_QUANTIZE`), with ONNX Runtime's ``onnxruntime.quantization``:
``int8_dynamic`` (weights int8 per output channel, activations quantized at run time) and
``int8_static`` (QDQ, activations calibrated on the job's dataset: it needs one).

This module is imported by the API: no torch, onnx or transformers at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DECODER_TASK = "text-generation-with-past"
ENCODER_TASK = "feature-extraction"
CLASSIFICATION_TASK = "text-classification"

# HF ``model_type`` -> the task its base export has (an encoder with a classification head is
# exported as CLASSIFICATION_TASK: see :func:`onnx_task`). Each decoder here was exported and run
# against transformers 5.17 with a KV cache (tests/test_export_onnx.py, bench/bench_onnx.py).
MODEL_TYPES: dict[str, str] = {
    "llama": DECODER_TASK,
    "mistral": DECODER_TASK,
    "qwen2": DECODER_TASK,
    "gpt2": DECODER_TASK,
    "gemma3_text": DECODER_TASK,
    "bert": ENCODER_TASK,
}

ONNX_QUANTIZE: tuple[str | None, ...] = (None, "int8_dynamic", "int8_static")

# Encoder heads the exporter writes: the bare model and a sequence-classification head.
ENCODER_ARCHITECTURES = frozenset({"BertModel", "BertForSequenceClassification"})

# RoPE variants that re-compute their frequencies from the sequence length inside forward (a
# Python branch on a tensor value): torch.export would fix that branch at the example's length,
# so the exported file would be wrong past it.
_LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def onnx_task(config: Mapping[str, Any]) -> str | None:
    """The task the exporter writes for this config.json, or None when it exports no such model."""
    base = MODEL_TYPES.get(str(config.get("model_type")))
    if base != ENCODER_TASK:
        return base
    archs = config.get("architectures") or []
    return CLASSIFICATION_TASK if any(str(a).endswith("ForSequenceClassification") for a in archs) else base


def _rope_type(config: Mapping[str, Any]) -> str | None:
    # transformers 5 names it rope_parameters, 4.x rope_scaling; either may be absent or null.
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key)
        if isinstance(value, Mapping):
            kind = value.get("rope_type") or value.get("type")
            if kind:
                return str(kind)
    return None


def _architecture_refusals(config: Mapping[str, Any]) -> list[str]:
    task = MODEL_TYPES[str(config["model_type"])]
    archs = [str(a) for a in config.get("architectures") or []]
    if task == ENCODER_TASK:
        other = [a for a in archs if a not in ENCODER_ARCHITECTURES]
        if other:
            return [
                f"ONNX export of {config['model_type']} writes {', '.join(sorted(ENCODER_ARCHITECTURES))}; "
                f"this model is {', '.join(other)}"
            ]
        return []
    other = [a for a in archs if not (a.endswith("ForCausalLM") or a.endswith("LMHeadModel"))]
    if other:
        return [
            f"ONNX export of decoders writes causal LMs (*ForCausalLM, *LMHeadModel); this model is {', '.join(other)}"
        ]
    return []


def refusals(
    config: dict[str, Any],
    tensors: dict[str, tuple[str, list[int]]],
    quantize: str | None,
    has_dataset: bool,
) -> list[str]:
    """Why this model cannot be exported to ONNX with ``quantize``; empty when it can.

    ``config`` is the model's config.json, ``has_dataset`` whether the job names a dataset
    (``int8_static`` calibrates on it). ``tensors`` (its safetensors headers, name -> (dtype,
    shape)) refuses nothing so far: the exporter loads every weight through transformers, which
    decompresses compressed-tensors artifacts, and writes float32."""
    del tensors
    out: list[str] = []
    if quantize not in ONNX_QUANTIZE:
        names = ", ".join("null" if q is None else q for q in ONNX_QUANTIZE)
        out.append(f"ONNX quantize {quantize!r} is not one of: {names}")
    elif quantize == "int8_static" and not has_dataset:
        out.append(
            "ONNX int8_static calibrates activations on the job's dataset: give the job a dataset, or use int8_dynamic"
        )
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in sorted(MODEL_TYPES.items()))
        what = f"model_type {model_type!r}" if model_type else "a model without a model_type in config.json"
        out.append(f"ONNX export does not support {what}; supported: {supported}")
        return out
    out += _architecture_refusals(config)
    rope = _rope_type(config)
    if rope in _LENGTH_DEPENDENT_ROPE:
        out.append(f"ONNX export cannot express {rope!r} RoPE scaling (its frequencies depend on the sequence length)")
    return out
