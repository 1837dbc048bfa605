"""Submit-time checks of the methods that write compressed-tensors checkpoints (the quantize.*
methods; worker/ct_format.py writes them): models whose artifact could not be written or loaded are
refused with a reason (ValueError -> 422).
"""

from __future__ import annotations

from typing import Any

# transformers model types whose projections are Conv1D (transformers/models/*: `= Conv1D(`).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})

CONV1D_REFUSAL = (
    "{method} writes a compressed-tensors checkpoint, which quantizes torch.nn.Linear layers only; "
    "{what} keeps its attention and MLP weights in transformers' Conv1D layers, so transformers could "
    "not load the packed weights. Use quantize.cast or prune.magnitude for this model."
)

# How the artifact runs, recorded in the report (measured: transformers 5.17 + compressed-tensors
# 0.19 on CPU decompress on the first forward; no integer matmul runs).
RUNS_DECOMPRESSED = "decompressed"


def _config_dims(config: dict[str, Any]) -> dict[str, int]:
    """Input widths of the model's Linear layers that the config names (best effort: the handler
    checks every layer again)."""
    dims: dict[str, int] = {}
    for cfg in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else None):
        if not cfg:
            continue
        for key in ("hidden_size", "intermediate_size"):
            v = cfg.get(key)
            if isinstance(v, int) and v > 0:
                dims[key] = v
        heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
        if isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0:
            dims["num_attention_heads * head_dim"] = heads * head_dim
    return dims


def check_model(method: str, info: Any, group_size: int | None = None) -> None:
    """Submit-time refusal (ValueError -> 422) of models whose artifact could not be written or
    loaded. ``info`` is core.methods.ModelInfo; only the config dict is read."""
    config = info.config or {}
    if "quantization_config" in config:
        qm = (config.get("quantization_config") or {}).get("quant_method", "?")
        raise ValueError(
            f"{method}: the model is already quantized (quant_method {qm!r}); upload the unquantized model"
        )
    model_type = config.get("model_type")
    if model_type in CONV1D_MODEL_TYPES:
        what = f"{info.architecture or 'this model'} (model_type {model_type!r})"
        raise ValueError(CONV1D_REFUSAL.format(method=method, what=what))
    if group_size:
        for key, v in _config_dims(config).items():
            if v % group_size:
                raise ValueError(
                    f"{method}: group_size {group_size} does not divide the model's {key} ({v}); "
                    "compressed-tensors groups consecutive input columns, so every Linear input width "
                    "must be a multiple of it: use a smaller group_size or null (per channel)"
                )
