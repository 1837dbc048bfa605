"""Submit-time checks of the methods that write compressed-tensors checkpoints (the quantize.*
methods; worker/ct_format.py writes them): models whose artifact could not be written or loaded are
refused with a reason (ValueError -> 422), and the limits behind those refusals, declared once
here for the methods to list (``MethodConstraint``).

Group sizes: compressed-tensors groups ``group_size`` consecutive input columns of a Linear weight
under one scale, so a layer takes a group size only where its input width is a multiple of it.
Models whose widths are not multiples of the common sizes are common (576, 960, 2880...), so a
layer the requested size does not divide gets its own group size (:func:`group_fallbacks`): the
largest of the accepted sizes (:data:`GROUP_SIZES`) below the requested one that divides its width,
or one scale per output channel where none does. The artifact records it as a config group of its
own naming those layers (compressed-tensors and vLLM match an exact layer name before the class
name ``Linear``), and the step's metrics list every such layer (``group_fallbacks``).

``strict_group_size: true`` keeps one layout: the job is refused instead (:func:`group_refusal`,
shared with the worker, which checks every layer again), naming the layers that block it and the
group sizes that would work. At submit the widths come from the model's safetensors headers
(``ModelInfo.tensors``), or, where those cannot be read, from the widths its config.json names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

from core.methods import MethodConstraint, ModelInfo, Refusal

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

# The group sizes the quantizers accept (null: one scale per output channel). The common kernels'
# sizes; each divides the next, so a model that takes 128 takes all three.
GROUP_SIZES = (32, 64, 128)

# Weights that are not quantized Linear layers although 2-D: embeddings, position tables and the LM
# head (worker/model_io.EMBEDDING_NAME_PATTERNS and core/jobs/plan.py's, which a test compares), and
# T5-style relative position tables (nn.Embedding, a few columns wide: no group size divides them).
NOT_LINEAR_PATTERNS = (
    "*embed*",
    "*wte*",
    "*wpe*",
    "*lm_head*",
    "*shared.weight",
    "*position*",
    "*relative_attention_bias*",
)
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Blocking layers listed in a refusal's body (``blocking_count`` has them all) and in its text.
MAX_LISTED, SHOWN = 100, 3

LINEAR_ONLY = MethodConstraint(
    id="linear_layers_only",
    rule=(
        "Quantizes torch.nn.Linear layers, every one but the LM head; embeddings, norms and biases stay "
        "in float. Models whose projections are transformers' Conv1D (GPT-2 style) are refused."
    ),
    values={"layer_types": ["torch.nn.Linear"], "refused_model_types": sorted(CONV1D_MODEL_TYPES)},
)
NOT_QUANTIZED = MethodConstraint(
    id="not_quantized",
    rule="The model must not be quantized already (config.json without quantization_config).",
)
GROUP_DIVIDES = MethodConstraint(
    id="group_divides_inputs",
    rule=(
        "compressed-tensors groups group_size consecutive input columns under one scale, so a layer "
        "takes group_size only where it divides its input width (in_features). A layer it does not "
        "divide gets the largest accepted group size below it that does, or one scale per output "
        "channel where none does, as a config group of its own; the step's metrics list each such "
        "layer (group_fallbacks). With strict_group_size: true the job is refused instead, and the "
        "refusal lists the blocking layers and the group sizes that divide every input width "
        "(blocking_layers, valid_group_sizes). null (one scale per output channel) always works."
    ),
    params=("group_size", "strict_group_size"),
    values={"group_sizes": list(GROUP_SIZES)},
)
STRICT_GROUP_SIZE_DESCRIPTION = (
    "true: refuse the job when group_size does not divide some quantized layer's input width; "
    "false (default): such a layer gets the largest accepted group size below group_size that "
    "divides its width, or per-channel scales (listed in the step's metrics as group_fallbacks)"
)
CT_CONSTRAINTS = (LINEAR_ONLY, NOT_QUANTIZED)


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


def ignored(module: str, ignore: Iterable[str]) -> bool:
    """Whether an ``ignore`` entry (a name, a name's last part or suffix, or ``re:<regex>``) names
    the module (as core/jobs/plan.py reads it: leniently, so no layer left in float blocks a job)."""
    for pat in ignore:
        if pat.startswith("re:"):
            if re.search(pat[3:], module):
                return True
        elif pat == module or module.endswith("." + pat) or pat == module.rsplit(".", 1)[-1]:
            return True
    return False


def linear_inputs(info: ModelInfo, ignore: Iterable[str] = ()) -> dict[str, int] | None:
    """Input width of every layer a quantizer targets, by module name, from the model's safetensors
    headers: 2-D float ``*.weight`` tensors, less embeddings, the LM head and ``ignore``. None when
    the headers are not known or cannot be read."""
    if info.tensors is None:
        return None
    try:
        tensors = info.tensors()
    except (OSError, ValueError):
        return None
    ignore = list(ignore)
    out: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) != 2 or t.dtype not in _FLOAT_DTYPES or not t.name.endswith(".weight"):
            continue
        module = t.name.removesuffix(".weight")
        if any(fnmatch.fnmatch(t.name, p) for p in NOT_LINEAR_PATTERNS) or ignored(module, ignore):
            continue
        out[module] = t.shape[1]
    return out


def valid_group_sizes(widths: Iterable[int], choices: Iterable[int] = GROUP_SIZES) -> list[int]:
    """The group sizes among ``choices`` that divide every width."""
    distinct = set(widths)
    return [g for g in choices if all(w % g == 0 for w in distinct)]


def _valid_text(valid: list[int]) -> str:
    if valid:
        return f"Group sizes that divide every input width: {', '.join(map(str, valid))}; or null (per channel)"
    accepted = ", ".join(map(str, GROUP_SIZES))
    return f"None of {accepted} divides every input width: use null (one scale per output channel)"


def fallback_group(group: int, width: int) -> int | None:
    """The group size a layer of input width ``width`` gets when ``group`` is asked for: ``group``
    where it divides the width, else the largest accepted size below it that does, else None
    (one scale per output channel)."""
    if width % group == 0:
        return group
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if g < group and width % g == 0), None)


def group_fallbacks(group: int | None, widths: Mapping[str, int]) -> dict[str, int | None]:
    """The layers (module name -> in_features) that ``group`` does not divide, each with the group
    size it gets instead (None: per output channel). Empty when ``group`` divides every width."""
    if not group:
        return {}
    return {name: fallback_group(group, w) for name, w in widths.items() if w % group}


def describe_fallbacks(fallbacks: Mapping[str, int | None]) -> dict[str, str | int]:
    """``group_fallbacks`` as metrics show it: per layer, its group size or ``"channel"``."""
    return {name: ("channel" if g is None else g) for name, g in sorted(fallbacks.items())}


def group_refusal(method: str, group: int, widths: Mapping[str, int]) -> Refusal | None:
    """The refusal of ``group`` when it does not divide the input width of some of the layers
    (``widths``: module name -> in_features), naming them and the group sizes that would work."""
    blocking = [(name, w) for name, w in widths.items() if w % group]
    if not blocking:
        return None
    n = len(blocking)
    shown = ", ".join(f"{name}: {w}" for name, w in blocking[:SHOWN]) + (f", and {n - SHOWN} more" if n > SHOWN else "")
    blocked_widths = ", ".join(map(str, sorted({w for _, w in blocking})))
    valid = valid_group_sizes(widths.values())
    return Refusal(
        f"{method}: group_size {group} does not divide the input width of {n} Linear layer{'s' if n > 1 else ''} "
        f"(width {blocked_widths}: {shown}); compressed-tensors groups consecutive input columns, so every "
        f"quantized layer's input width must be a multiple of group_size. {_valid_text(valid)}",
        constraint=GROUP_DIVIDES.id,
        param="group_size",
        group_size=group,
        blocking_layers=[{"name": name, "in_features": w} for name, w in blocking[:MAX_LISTED]],
        blocking_count=n,
        valid_group_sizes=valid,
    )


def check_group(
    method: str, info: ModelInfo, group_size: int | None, ignore: Iterable[str] = (), *, strict: bool = False
) -> None:
    """With ``strict``, refuse a group size that does not divide every quantized layer's input
    width: from the safetensors headers when known, else from the widths config.json names.
    Without it nothing is refused: such layers fall back (:func:`group_fallbacks`) in the worker."""
    if not group_size or not strict:
        return
    widths = linear_inputs(info, ignore)
    if widths is not None:
        refusal = group_refusal(method, group_size, widths)
        if refusal is not None:
            raise refusal
        return
    dims = _config_dims(info.config or {})
    blocking = {key: v for key, v in dims.items() if v % group_size}
    if blocking:
        valid = valid_group_sizes(dims.values())
        named = ", ".join(f"{key} ({v})" for key, v in blocking.items())
        raise Refusal(
            f"{method}: group_size {group_size} does not divide the model's {named}; compressed-tensors groups "
            "consecutive input columns, so every Linear input width must be a multiple of it. "
            f"{_valid_text(valid)}",
            constraint=GROUP_DIVIDES.id,
            param="group_size",
            group_size=group_size,
            blocking_config=blocking,
            valid_group_sizes=valid,
        )


def check_model(
    method: str,
    info: ModelInfo,
    group_size: int | None = None,
    ignore: Iterable[str] = (),
    *,
    strict_group_size: bool = False,
) -> None:
    """Submit-time refusal (ValueError -> 422) of models whose artifact could not be written or
    loaded: already quantized, Conv1D projections, and (``strict_group_size``) a group size that
    does not divide every layer."""
    config = info.config or {}
    if "quantization_config" in config:
        qm = (config.get("quantization_config") or {}).get("quant_method", "?")
        raise Refusal(
            f"{method}: the model is already quantized (quant_method {qm!r}); upload the unquantized model",
            constraint=NOT_QUANTIZED.id,
        )
    model_type = config.get("model_type")
    if model_type in CONV1D_MODEL_TYPES:
        what = f"{info.architecture or 'this model'} (model_type {model_type!r})"
        raise Refusal(CONV1D_REFUSAL.format(method=method, what=what), constraint=LINEAR_ONLY.id)
    check_group(method, info, group_size, ignore, strict=strict_group_size)
