"""Parameters and submit-time checks shared by the methods that run through llm-compressor (Wanda,
SparseGPT, GPTQ, SmoothQuant, AWQ). The running side is worker/llmc.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.methods import ModelInfo, StrictParams, has_tokenizer
from core.methods._ct import CONV1D_MODEL_TYPES
from core.methods._ct import check_model as ct_check


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
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=64,
        description="modules left in float: names, or 're:<regex>' patterns (the LM head by default)",
    )

    @model_validator(mode="after")
    def _group(self) -> QuantizeParams:
        if self.group_size is not None and self.group_size not in (32, 64, 128):
            raise ValueError("group_size must be 32, 64, 128 or null")
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
        raise ValueError(
            f"{method} calibrates on the job's dataset tokenized with the model's own tokenizer: upload "
            "tokenizer.json (or vocab.txt, or vocab.json + merges.txt) with the model"
        )
    if config.get("model_type") in CONV1D_MODEL_TYPES:
        raise ValueError(
            f"{method} runs through llm-compressor, which prunes and quantizes torch.nn.Linear layers only; "
            f"{info.architecture or 'this model'} (model_type {config.get('model_type')!r}) keeps its attention "
            "and MLP weights in transformers' Conv1D layers, so nothing would be compressed. "
            "Use prune.magnitude or quantize.cast"
        )
    if quantizes and "quantization_config" in config:
        raise ValueError(f"{method}: the model is already quantized; upload the unquantized model")


def check_group(method: str, info: ModelInfo, group_size: int | None) -> None:
    ct_check(method, info, group_size)


def nm_sparsity(mask: str) -> float:
    """``"2:4"`` -> 0.5: N of every M consecutive weights are zero (llm-compressor's reading)."""
    n, m = (int(x) for x in mask.split(":"))
    return n / m
