"""GGUF (llama.cpp) export: what can be exported, checked from the config and safetensors headers.

Pure python on purpose: the API imports this to refuse a job at submit, so no torch, numpy or
``gguf`` here; the converter itself is worker/export/gguf.py.

Tensor types. F16 / BF16 keep every matrix in 16-bit floats. Q8_0 and Q4_0 store blocks of 32
weights of one row with one float16 scale ``d``: ``w = d * q`` with ``q`` int8 (Q8_0) or
``q - 8`` for a nibble ``q`` in 0..15 (Q4_0), so every row length must be a multiple of 32.
Q4_K_M is llama.cpp's mixed 4/6-bit K-quant (super-blocks of 256), made by llama.cpp's own
quantizer; like llama.cpp, a matrix whose rows are not a multiple of 256 falls back to a
32-block type there, so only rows that are not a multiple of 32 are refused for it. 1-D tensors
(norms, biases) stay float32 in every type, as llama.cpp keeps them.

Exactness. A symmetric integer weight ``scale * q`` with ``q`` in int8 (8 bits) or -8..7 (4 bits),
the scale shared by a group of consecutive input columns that 32 divides (or by the whole row),
is a Q8_0 / Q4_0 block as it stands: each block of 32 takes its group's scale as ``d``. So a
job whose last quantization is such a scheme is exported with its own integers, no second
rounding (``exact_type``); only the scale changes dtype (float16 in GGUF), which is exact
wherever the stored scale is a float16 value.
"""

from __future__ import annotations

from typing import Any

GGUF_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M")

# HF config.json model_type -> llama.cpp architecture (general.architecture). Mistral is Llama in
# llama.cpp (same tensors, same q/k permutation; sliding windows are not used by these models'
# GGUF conversions either).
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gpt2": "gpt2",
    # Gemma 3's text model (Gemma3ForCausalLM): norms store w with x * (1 + w), llama.cpp stores 1 + w
    "gemma3_text": "gemma3",
}

# Rows must be a multiple of this for each type (0: any length).
BLOCK = {"F16": 0, "BF16": 0, "Q8_0": 32, "Q4_0": 32, "Q4_K_M": 32}

# Config keys each architecture's metadata is built from (missing -> the converter cannot work).
_REQUIRED = {
    "llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
    "qwen2": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
    "gpt2": ("n_embd", "n_layer", "n_head", "vocab_size"),
    "gemma3": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
}

# Conv1D (GPT-2) weights are stored (in, out): the GGUF row is the first axis.
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

# Methods whose last step stores symmetric integers with per-row or per-group scales (and how many
# bits): quantize.weight_only's params say it; the llm-compressor presets are symmetric too.
_GPTQ_BITS = {"W4A16": 4, "W8A16": 8, "W8A8": 8}
_QUANT_METHODS = (
    "quantize.weight_only",
    "quantize.fixed_point",
    "quantize.dynamic_int8",
    "quantize.gptq",
    "quantize.awq",
    "quantize.smoothquant",
)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def arch(config: dict[str, Any]) -> str | None:
    """The llama.cpp architecture of an HF config, None when not exportable."""
    return MODEL_TYPES.get(str(config.get("model_type", "")))


def refusals(config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]], gguf_type: str) -> list[str]:
    """Why this model cannot be written as a ``gguf_type`` GGUF file; empty when it can.

    ``tensors``: name -> (safetensors dtype, shape) from the model's headers (may be empty when
    unknown: then only the config is checked, and the worker checks the shapes again)."""
    out: list[str] = []
    if gguf_type not in GGUF_TYPES:
        out.append(f"GGUF type {gguf_type!r} is not supported; supported: {', '.join(GGUF_TYPES)}")
    model_type = config.get("model_type")
    a = arch(config)
    if a is None:
        supported = ", ".join(sorted(MODEL_TYPES))
        out.append(f"model_type {model_type!r} cannot be exported to GGUF; supported model types: {supported}")
        return out
    missing = [k for k in _REQUIRED[a] if not _positive_int(config.get(k))]
    if missing:
        out.append(f"config.json lacks {', '.join(missing)} (positive integers), needed for the GGUF metadata")
        return out
    out += _head_refusals(config, a)
    if a == "gemma3":
        out += _gemma3_refusals(config)
    out += _quant_config_refusals(config)
    out += _vocab_refusals(config, tensors)
    if gguf_type in BLOCK:
        out += _shape_refusals(config, tensors, gguf_type)
    return out


def _head_refusals(config: dict[str, Any], a: str) -> list[str]:
    if a == "gpt2":
        return [] if config["n_embd"] % config["n_head"] == 0 else ["n_embd is not a multiple of n_head"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    out = []
    if heads % kv:
        out.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if a == "llama" and head_dim % 2:
        # the q/k permutation (llama.cpp's rotary layout) splits each head's rows in two halves
        out.append(f"head dimension {head_dim} is odd: llama.cpp's rotary layout needs an even one")
    kind = rope(config)[0]
    if kind not in ("default", "linear", "llama3"):
        out.append(f"rope type {kind!r} is not exported to GGUF (supported: default, linear, llama3)")
    if config.get("use_sliding_window"):
        out.append("sliding-window attention (use_sliding_window) is not expressed in GGUF's qwen2/llama models")
    return out


def rope(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(rope type, its parameters) from ``rope_parameters`` (transformers 5) or ``rope_scaling``;
    for models with per-layer-type parameters (Gemma 3), those of the full-attention layers."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    return str(params.get("rope_type") or params.get("type") or "default"), params


def _gemma3_refusals(config: dict[str, Any]) -> list[str]:
    """llama.cpp's gemma3 scales attention by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the
    62-layer 27B), where transformers uses ``query_pre_attn_scalar``: they must agree."""
    head_dim = config.get("head_dim") or 256
    scalar = config.get("query_pre_attn_scalar", head_dim)
    want = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 else head_dim
    if scalar != want:
        return [f"query_pre_attn_scalar {scalar} differs from {want}, the attention scale llama.cpp's gemma3 uses"]
    return []


def _quant_config_refusals(config: dict[str, Any]) -> list[str]:
    qc = config.get("quantization_config")
    if not qc:
        return []
    if qc.get("quant_method") != "compressed-tensors":
        return [f"quantization_config {qc.get('quant_method')!r}: only compressed-tensors artifacts are converted"]
    fmt = qc.get("format")
    if fmt not in ("pack-quantized", "int-quantized", "naive-quantized", "dense", None):
        return [
            f"compressed-tensors format {fmt!r} is not converted to GGUF (supported: pack-quantized, "
            "int-quantized, naive-quantized, dense)"
        ]
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        return [
            f"sparse compressed-tensors format {sparsity.get('format')!r} is not converted to GGUF "
            "(GGUF stores dense tensors)"
        ]
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("type", "int") != "int":
            return [f"quantization group {name}: {w.get('type')} weights are not converted to GGUF (int only)"]
        if w.get("actorder") not in (None, "static"):
            return [
                f"quantization group {name}: activation-ordered groups (actorder {w.get('actorder')!r}) "
                "are not converted to GGUF"
            ]
    return []


def _vocab_refusals(config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]]) -> list[str]:
    n = config["vocab_size"]
    out = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = config.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and not 0 <= i < n:
                out.append(f"{key} {i} is outside the vocabulary (vocab_size {n})")
    for name, (_, shape) in tensors.items():
        if name.endswith(("embed_tokens.weight", "wte.weight")) and shape and shape[0] != n:
            out.append(f"{name} has {shape[0]} rows but vocab_size is {n}: the GGUF vocabulary must match")
    return out


def _row_length(config: dict[str, Any], name: str, dtype: str, shape: list[int]) -> int | None:
    """Length of the GGUF rows of a matrix, None for tensors that stay float (1-D, scales)."""
    if name.endswith(".weight_packed"):
        bits = _bits(config)
        return shape[-1] * 32 // bits if bits else None
    if not name.endswith(".weight") or len(shape) != 2 or dtype.startswith(("I", "U")) and dtype != "I8":
        return None
    if name.endswith(CONV1D_SUFFIXES) and config.get("model_type") == "gpt2":
        return shape[0]
    if name.endswith(("wpe.weight", "position_embeddings.weight")):
        return None  # learned positions stay float32, as llama.cpp's converter keeps them
    return shape[1]


def _bits(config: dict[str, Any]) -> int | None:
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    for group in groups.values():
        bits = (group.get("weights") or {}).get("num_bits")
        if isinstance(bits, int):
            return bits
    return None


def _shape_refusals(config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]], gguf_type: str) -> list[str]:
    block = BLOCK[gguf_type]
    if not block:
        return []
    bad = []
    for name, (dtype, shape) in sorted(tensors.items()):
        row = _row_length(config, name, dtype, shape)
        if row is not None and row % block:
            bad.append(f"{name} (rows of {row})")
    if not bad:
        return []
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return [
        f"{gguf_type} stores rows in blocks of {block} weights; these rows are not a multiple of {block}: "
        f"{', '.join(bad[:5])}{more}. F16 or BF16 can hold them"
    ]


def exact_type(steps: list[dict[str, Any]]) -> str | None:
    """The GGUF type that holds the last quantization step's integers exactly, else None.

    Symmetric integers with a per-row or per-group scale (groups of 32, 64, 128: multiples of the
    32-weight block) are Q8_0 blocks (8 bits, or 5-7) or Q4_0 blocks (4 bits or fewer, -8..7)
    with the group's scale in every block. Asymmetric ones (a zero point) are not: Q4_0/Q8_0
    have none. W8A8 schemes also quantize activations at run time; their weights are exact Q8_0
    and llama.cpp quantizes activations in its own way (per block of 32)."""
    quant = [s for s in steps if s.get("method") in _QUANT_METHODS]
    if not quant or quant[-1] is not steps[-1]:
        return None
    bits = _step_bits(quant[-1])
    if bits is None:
        return None
    return "Q4_0" if bits <= 4 else "Q8_0"


def _step_bits(step: dict[str, Any]) -> int | None:
    """Bits of a symmetric integer step whose scales are per row or per group of a multiple of 32."""
    method, params = step["method"], step.get("params") or {}
    group = params.get("group_size")
    if group is not None and (not isinstance(group, int) or group % 32):
        return None
    if method == "quantize.weight_only":
        bits = params.get("bits")
        return bits if isinstance(bits, int) and params.get("symmetric", True) is True else None
    if method == "quantize.fixed_point":
        bits = params.get("bits", 8)  # power-of-two scale per row, zero point 0
        return bits if isinstance(bits, int) else None
    if method in ("quantize.dynamic_int8", "quantize.smoothquant"):
        return 8
    if method == "quantize.gptq":
        return _GPTQ_BITS.get(params.get("scheme", "W4A16"))
    # quantize.awq's W4A16 is llm-compressor's preset: symmetric 4-bit groups
    return 4 if method == "quantize.awq" else None
