"""``quantize.fp4``: 4-bit floating-point weights (e2m1), the microscaling formats vLLM serves on
Blackwell GPUs (NVFP4) and that MX hardware defines (MXFP4), through llm-compressor's presets.

``scheme``:

- ``NVFP4A16`` (default): weights in FP4 groups of 16 input columns, each group with an FP8
  (e4m3) scale, under one float32 global scale per tensor (shared by the layers vLLM fuses:
  q/k/v, gate/up); activations stay 16-bit. Data-free.
- ``NVFP4``: the same weights, and activations quantized to NVFP4 at run time, whose global scale
  is calibrated on the job's dataset (``dataset_id``, ``num_samples`` texts of at most
  ``max_length`` tokens, tokenized with the model's tokenizer): the job needs a dataset.
- ``MXFP4A16``: weights in FP4 groups of 32 with power-of-two (e8m0) scales; 16-bit activations.
  Data-free.
- ``MXFP4``: the same weights, activations quantized to MXFP4 at run time. Data-free.

``ignore``: modules left in float (``["lm_head"]`` by default; names, name suffixes or
``re:<regex>`` patterns). The LM head always stays in float, as do embeddings, norms and biases.
NVFP4's global scale is shared by the layers vLLM fuses into one matmul (q/k/v projections,
gate/up projections, as llm-compressor does): ``ignore`` must take all of such a group or none of
it (refused at submit otherwise).

Every quantized layer's input width must be a multiple of the scheme's group (16 for NVFP4, 32
for MXFP4): a model whose layers are not is refused at submit, naming the layers (or the config
widths) that block it; ``ignore`` those layers to quantize the others. GPT-2-style Conv1D models,
already-quantized models and bare state dicts are refused too; ``NVFP4`` also needs the model's
tokenizer files.

The data-free schemes run through the streaming engine (tensor by tensor from the input shards,
llm-compressor's model-free observers; a weight is quantized whole, so memory follows the largest
quantized weight, not the model; NVFP4 reads the fused layers once more first for their shared
global scale); the in-memory path (``oneshot``) writes the same bytes. ``NVFP4`` runs through
``oneshot``'s sequential pipeline with the whole model in memory.
The artifact is a compressed-tensors checkpoint (``nvfp4-pack-quantized`` or
``mxfp4-pack-quantized``: two FP4 values a byte in ``weight_packed``, plus ``weight_scale`` and,
for NVFP4, ``weight_global_scale``). vLLM runs it with FP4 kernels where the GPU has them.
transformers loads it on a CPU by dequantizing the weights (no FP4 kernel runs; NVFP4's and
MXFP4's activations are quantized and dequantized in floating point): the report's quality figures
on a CPU worker are those of the dequantized weights, and it says so. Must be the last step.

Example: ``{"method": "quantize.fp4", "params": {"scheme": "NVFP4A16"}}``
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal, get_args

from pydantic import Field

from core.methods import MethodConstraint, ModelInfo, Refusal, register
from core.methods._ct import CT_CONSTRAINTS, SHOWN, _config_dims, check_model, linear_inputs
from core.methods._llmc import CalibrationParams
from core.methods._llmc import check_model as llmc_check_model

# Input columns per scale, by scheme (compressed-tensors presets: NVFP4 16, MXFP4 32).
GROUP = {"NVFP4A16": 16, "NVFP4": 16, "MXFP4A16": 32, "MXFP4": 32}
# Schemes without calibration: the streaming engine runs them (worker/stream/fp.py).
DATA_FREE = frozenset({"NVFP4A16", "MXFP4A16", "MXFP4"})
MAX_LISTED = 100


class QuantizeFP4Params(CalibrationParams):
    scheme: Literal["NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4"] = Field(
        default="NVFP4A16",
        description="NVFP4A16: FP4 weights in groups of 16 with FP8 scales and a global scale (data-free); "
        "NVFP4: and FP4 activations with a calibrated global scale (needs data); MXFP4A16: groups of 32 "
        "with power-of-two scales (data-free); MXFP4: and MXFP4 activations (data-free)",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=64,
        description="modules left in float: names, or 're:<regex>' patterns (the LM head always is)",
    )


SCHEME = MethodConstraint(
    id="fp4_scheme",
    rule=(
        "scheme NVFP4A16, MXFP4A16 or MXFP4 is data-free and streams; NVFP4 calibrates its activations' "
        "global scale and needs the job's dataset_id and the model's tokenizer files."
    ),
    params=("scheme",),
    values={
        "schemes": list(get_args(QuantizeFP4Params.model_fields["scheme"].annotation)),
        "data_free": sorted(DATA_FREE),
    },
)
GROUP_WIDTH = MethodConstraint(
    id="fp4_group_divides_inputs",
    rule=(
        "Every quantized Linear layer's input width must be a multiple of the scheme's group: 16 (NVFP4, "
        "NVFP4A16) or 32 (MXFP4, MXFP4A16). A refusal lists the blocking layers (blocking_layers); add them "
        "to ignore to keep them in float."
    ),
    params=("scheme", "ignore"),
    values={"group_size": dict(GROUP)},
)


def width_refusal(
    method: str,
    scheme: str,
    group: int | None,
    widths: Mapping[str, int],
    what: str = "stores FP4 weights",
    constraint: str = "fp4_group_divides_inputs",
) -> Refusal | None:
    """The refusal of ``scheme`` on layers (``widths``: module name -> input width) that its groups
    of ``group`` columns do not divide, naming them (quantize.fp8's FP8_BLOCK uses it too)."""
    if not group:
        return None
    blocking = [(n, w) for n, w in widths.items() if w % group]
    if not blocking:
        return None
    n = len(blocking)
    shown = ", ".join(f"{name}: {w}" for name, w in blocking[:SHOWN]) + (f", and {n - SHOWN} more" if n > SHOWN else "")
    return Refusal(
        f"{method}: scheme {scheme} {what} in groups of {group} consecutive input columns, but "
        f"{n} Linear layer{'s' if n > 1 else ''} ha{'ve' if n > 1 else 's'} an input width that is not a "
        f"multiple of {group} ({shown}), so the format cannot express {'them' if n > 1 else 'it'}. "
        "Add them to ignore to keep them in float"
        + (", or use quantize.fp8" if method == "quantize.fp4" else ", or use scheme FP8_DYNAMIC"),
        constraint=constraint,
        param="scheme",
        group_size=group,
        blocking_layers=[{"name": name, "in_features": w} for name, w in blocking[:MAX_LISTED]],
        blocking_count=n,
    )


# Layers vLLM runs as one matmul (QKVParallelLinear, MergedColumnParallelLinear), by module name:
# NVFP4 gives them one global scale (llm-compressor's fuse_weight_observers matches these), so
# they are quantized all or none.
FUSED_PATTERNS = (
    r"^(?P<p>.*(?:attn|attention))\.(?:q_proj|k_proj|v_proj)$",
    r"^(?P<p>.*mlp)\.(?:gate_proj|up_proj)$",
)
FUSED_TOGETHER = MethodConstraint(
    id="fused_layers_together",
    rule=(
        "NVFP4 schemes share one global scale across the layers vLLM fuses (q/k/v projections, gate/up "
        "projections): ignore all of a group or none of it."
    ),
    params=("scheme", "ignore"),
)


def fused_groups(names: Iterable[str]) -> dict[str, str]:
    """Module name -> the name of its fused group (the module itself when it has none)."""
    out: dict[str, str] = {}
    for n in names:
        out[n] = n
        for i, pat in enumerate(FUSED_PATTERNS):
            m = re.match(pat, n)
            if m:
                out[n] = f"{m.group('p')}#{i}"
                break
    return out


def split_fused_refusal(method: str, scheme: str, quantized: Iterable[str], every: Iterable[str]) -> Refusal | None:
    """The refusal of an NVFP4 scheme that would quantize part of a fused group (``quantized``: the
    layers it quantizes, ``every``: every Linear layer), or None."""
    if not scheme.startswith("NVFP4"):
        return None
    quantized = set(quantized)
    groups = fused_groups(every)
    members: dict[str, list[str]] = {}
    for n, g in groups.items():
        members.setdefault(g, []).append(n)
    split = sorted(g for g, ns in members.items() if len(ns) > 1 and 0 < len(quantized & set(ns)) < len(ns))
    if not split:
        return None
    names = [sorted(members[g]) for g in split]
    return Refusal(
        f"{method}: scheme {scheme} gives the layers vLLM fuses into one matmul one global scale, so they are "
        f"quantized all or none; ignore leaves part of {len(split)} such group{'s' if len(split) > 1 else ''} in "
        f"float ({', '.join(' + '.join(ns) for ns in names[:SHOWN])}). Ignore every layer of a group or none",
        constraint=FUSED_TOGETHER.id,
        param="ignore",
        split_groups=names[:MAX_LISTED],
    )


def input_widths(info: ModelInfo, ignore: list[str]) -> dict[str, int]:
    """Input width of every layer a step quantizes, from the safetensors headers, or where those
    are not known the widths config.json names (the worker checks every layer again)."""
    widths = linear_inputs(info, ignore)
    return widths if widths is not None else dict(_config_dims(info.config or {}))


def _check(params: QuantizeFP4Params, info: ModelInfo) -> None:
    if params.scheme not in DATA_FREE:
        llmc_check_model("quantize.fp4", info, quantizes=True)
    check_model("quantize.fp4", info, None, params.ignore)
    widths = input_widths(info, params.ignore)
    refusal = width_refusal("quantize.fp4", params.scheme, GROUP[params.scheme], widths)
    every = linear_inputs(info)
    if refusal is None and every is not None:
        refusal = split_fused_refusal("quantize.fp4", params.scheme, widths, every)
    if refusal is not None:
        raise refusal


register(
    "quantize.fp4",
    params=QuantizeFP4Params,
    summary="FP4 (e2m1) weights in microscaled groups: NVFP4 or MXFP4, 16-bit or FP4 activations (vLLM).",
    formats=("hf",),
    check=_check,
    final=True,
    streams=True,
    needs_data_when=lambda params: params.scheme not in DATA_FREE,
    constraints=[SCHEME, GROUP_WIDTH, FUSED_TOGETHER, *CT_CONSTRAINTS],
)
