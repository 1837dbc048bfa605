"""``prune.magnitude``: unstructured magnitude pruning (the study's ``w = 0 if |w| < θ``).

Either ``sparsity`` (fraction of target weights to zero, smallest magnitudes first) or
``threshold`` θ (zero every weight with ``|w| < θ``). Targets are every ``nn.Linear`` and GPT-2
``Conv1D`` weight except the input embeddings and the LM head; ``targets``/``exclude`` narrow
them with module-name glob patterns (``"*.mlp.*"``, ``"transformer.h.0.*"``).

``scope``: ``global`` (default) ranks all target weights together (one threshold, so layers with
small weights lose more); ``layer`` prunes the same fraction from each weight matrix; ``row`` the
same fraction from each output row. ``scope`` applies to ``sparsity`` only.

Zeros alone do not shrink a dense safetensors file, and the artifact stores weight files without
deflate (it cost most of a large job's saving time; docs/STREAMING.md): quantize after pruning
(e.g. ``prune.magnitude`` then ``quantize.weight_only``) for a smaller artifact.

Example: ``{"method": "prune.magnitude", "params": {"sparsity": 0.5}}``
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.methods import MethodConstraint, StrictParams, register


class PruneMagnitudeParams(StrictParams):
    sparsity: float | None = Field(default=None, gt=0, lt=1, description="fraction of target weights set to zero")
    threshold: float | None = Field(default=None, gt=0, description="zero weights with |w| < threshold")
    scope: Literal["global", "layer", "row"] = "global"
    targets: list[str] | None = Field(default=None, max_length=64, description="module-name glob patterns to include")
    exclude: list[str] | None = Field(default=None, max_length=64, description="module-name glob patterns to skip")

    @model_validator(mode="after")
    def _one_of(self) -> PruneMagnitudeParams:
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("give exactly one of 'sparsity' or 'threshold'")
        if self.threshold is not None and self.scope != "global":
            raise ValueError("'scope' applies to 'sparsity' only")
        return self


register(
    "prune.magnitude",
    params=PruneMagnitudeParams,
    summary="Unstructured magnitude pruning: global, per-layer or per-row sparsity, or a threshold.",
    streams=True,
    constraints=[
        MethodConstraint(
            id="sparsity_or_threshold",
            rule="Give exactly one of sparsity and threshold; scope applies to sparsity only.",
            params=("sparsity", "threshold", "scope"),
        ),
        MethodConstraint(
            id="target_layers",
            rule=(
                "Prunes every torch.nn.Linear and GPT-2 Conv1D weight except the input embeddings and the LM "
                "head (of a bare state dict: every 2-D float *.weight not named like an embedding or head), "
                "narrowed by targets / exclude."
            ),
            checked=None,
            values={"layer_types": ["torch.nn.Linear", "transformers Conv1D"]},
        ),
    ],
)
