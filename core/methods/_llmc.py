"""Parameters and submit-time checks shared by the methods that run through llm-compressor (Wanda,
SparseGPT, GPTQ, SmoothQuant, AWQ). The running side is worker/llmc.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.methods import NEEDS_TOKENIZER, MethodConstraint, ModelInfo, Refusal, StrictParams, has_tokenizer
from core.methods._ct import CONV1D_MODEL_TYPES, GROUP_SIZES, NOT_QUANTIZED, STRICT_GROUP_SIZE_DESCRIPTION
from core.methods._ct import check_group as ct_check_group

# The limits every llm-compressor method has (each method's file lists them with its own).
LINEAR_ONLY = MethodConstraint(
    id="linear_layers_only",
    rule=(
        "Compresses the torch.nn.Linear layers of the model's blocks, never the LM head (llm-compressor); "
        "models whose projections are transformers' Conv1D (GPT-2 style) are refused."
    ),
    values={"layer_types": ["torch.nn.Linear"], "refused_model_types": sorted(CONV1D_MODEL_TYPES)},
)
SPARSITY_OR_MASK = MethodConstraint(
    id="sparsity_or_mask",
    rule="Give sparsity or mask (N:M); a mask sets the sparsity (2:4 and 4:8 are 0.5), so both must agree.",
    params=("sparsity", "mask"),
    values={"masks": ["2:4", "4:8"]},
)
PRUNE_CONSTRAINTS = (SPARSITY_OR_MASK, NEEDS_TOKENIZER, LINEAR_ONLY)
QUANTIZE_CONSTRAINTS = (NEEDS_TOKENIZER, LINEAR_ONLY, NOT_QUANTIZED)
W8A8_PER_CHANNEL = MethodConstraint(
    id="w8a8_per_channel",
    rule="Scheme W8A8 quantizes weights per output channel: group_size must be left out or null.",
    params=("scheme", "group_size"),
)


def architecture_constraint(method: str, supported: frozenset[str], what: str) -> MethodConstraint:
    """The architectures llm-compressor has ``what`` for (AWQ, SmoothQuant); others are refused."""
    return MethodConstraint(
        id="architectures",
        rule=f"{method} needs llm-compressor's {what} for the model's architecture: the ones listed.",
        values={"architectures": sorted(supported)},
    )


class CalibrationParams(StrictParams):
    """Calibration data every llm-compressor method takes from the job's ``dataset_id``."""

    num_samples: int = Field(
        default=128, ge=1, le=4096, description="calibration texts used (the first N of the dataset)"
    )
    max_length: int = Field(
        default=512, ge=8, le=131_072, description="tokens per calibration text (longer texts are cut)"
    )


class PruneParams(CalibrationParams):
    """``sparsity`` (unstructured, per layer) or ``mask`` (N:M: N zeros in every M consecutive
    weights of a row, which sparse tensor cores run at up to 2x)."""

    sparsity: float | None = Field(
        default=None, gt=0, lt=1, description="fraction of each pruned layer's weights set to zero"
    )
    mask: Literal["2:4", "4:8"] | None = Field(default=None, description="N:M semi-structured sparsity (50%)")
    ignore: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="more modules to leave dense: names, or 're:<regex>' patterns (the LM head always is)",
    )

    @model_validator(mode="after")
    def _one_of(self) -> PruneParams:
        if self.sparsity is None and self.mask is None:
            raise ValueError("give 'sparsity' or 'mask'")
        if self.mask is not None and self.sparsity is not None and abs(self.sparsity - nm_sparsity(self.mask)) > 1e-9:
            raise ValueError(f"mask {self.mask} means sparsity {nm_sparsity(self.mask)}; leave 'sparsity' out")
        return self

    @property
    def target_sparsity(self) -> float:
        return nm_sparsity(self.mask) if self.mask else float(self.sparsity)  # type: ignore[arg-type]


# Weight (and activation) formats of the integer schemes, as compressed-tensors QuantizationArgs.
SCHEMES: dict[str, dict[str, Any]] = {
    "W4A16": {"weights": {"num_bits": 4, "type": "int", "symmetric": True}, "input_activations": None},
    "W8A16": {"weights": {"num_bits": 8, "type": "int", "symmetric": True}, "input_activations": None},
    # Activations: int8, per token, quantized at run time (as quantize.dynamic_int8).
    "W8A8": {
        "weights": {"num_bits": 8, "type": "int", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    },
}
DEFAULT_GROUP = {"W4A16": 128, "W8A16": None, "W8A8": None}


class QuantizeParams(CalibrationParams):
    """The integer scheme of a calibrated quantizer."""

    group_size: int | None = Field(
        default=None,
        description="input columns sharing a scale: 32, 64 or 128; null: per "
        "channel. Omitted: 128 for W4A16, per channel for W8A16 and W8A8",
    )
    strict_group_size: bool = Field(default=False, strict=True, description=STRICT_GROUP_SIZE_DESCRIPTION)
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=64,
        description="modules left in float: names, or 're:<regex>' patterns (the LM head by default)",
    )

    @model_validator(mode="after")
    def _group(self) -> QuantizeParams:
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be {', '.join(map(str, GROUP_SIZES))} or null")
        return self

    def effective_group(self, scheme: str) -> int | None:
        g = self.group_size if "group_size" in self.model_fields_set else DEFAULT_GROUP[scheme]
        if scheme == "W8A8" and g is not None:
            raise ValueError("W8A8 quantizes weights per channel: leave group_size out (or null)")
        return g


def check_model(method: str, info: ModelInfo, *, quantizes: bool) -> None:
    """Submit-time refusals shared by the llm-compressor methods (ValueError -> 422)."""
    config = info.config or {}
    if not has_tokenizer(info.files):
        raise Refusal(
            f"{method} calibrates on the job's dataset tokenized with the model's own tokenizer: upload "
            "tokenizer.json (or vocab.txt, or vocab.json + merges.txt) with the model",
            constraint=NEEDS_TOKENIZER.id,
        )
    if config.get("model_type") in CONV1D_MODEL_TYPES:
        raise Refusal(
            f"{method} runs through llm-compressor, which prunes and quantizes torch.nn.Linear layers only; "
            f"{info.architecture or 'this model'} (model_type {config.get('model_type')!r}) keeps its attention "
            "and MLP weights in transformers' Conv1D layers, so nothing would be compressed. "
            "Use prune.magnitude or quantize.cast",
            constraint=LINEAR_ONLY.id,
        )
    if quantizes and "quantization_config" in config:
        raise Refusal(
            f"{method}: the model is already quantized; upload the unquantized model", constraint=NOT_QUANTIZED.id
        )


def check_group(method: str, info: ModelInfo, params: QuantizeParams, scheme: str) -> None:
    """With ``strict_group_size``, refuse a group size (given, or the scheme's default) that does not
    divide the input width of every Linear layer the step quantizes (its ``ignore`` left out);
    without it such layers fall back to a group size of their own: core/methods/_ct.py."""
    try:
        group = params.effective_group(scheme)
    except ValueError as e:
        raise Refusal(str(e), constraint=W8A8_PER_CHANNEL.id, param="group_size") from None
    ct_check_group(method, info, group, params.ignore, strict=params.strict_group_size)


def nm_sparsity(mask: str) -> float:
    """``"2:4"`` -> 0.5: N of every M consecutive weights are zero (llm-compressor's reading)."""
    n, m = (int(x) for x in mask.split(":"))
    return n / m
