"""``prune.magnitude``: the handler (core/methods/prune_magnitude.py has the method's parameters,
checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.prune_magnitude import PruneMagnitudeParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


def _stream(params: PruneMagnitudeParams, ctx: Any) -> Any:
    from worker.stream.steps import PruneStep

    return PruneStep(params.sparsity, params.threshold, params.scope, params.targets, params.exclude)


@handler("prune.magnitude", stream=_stream)
def prune_magnitude(model: LoadedModel, params: PruneMagnitudeParams, ctx: MethodContext) -> Metrics:
    """Unstructured magnitude pruning: global, per-layer or per-row sparsity, or a threshold."""
    from worker.ops import sparsity as ops

    targets = model.targets(params.targets, params.exclude)
    if not targets:
        raise ValueError("no target weights matched (check 'targets' and 'exclude')")
    weights = [t.weight for t in targets]
    total = sum(w.numel() for w in weights)
    if params.threshold is not None:
        zeros = ops.prune_below(weights, params.threshold, inclusive=False)
    elif params.scope == "global":
        zeros = ops.prune_global(weights, params.sparsity)
    elif params.scope == "layer":
        zeros = ops.prune_per_tensor(weights, params.sparsity)
    else:
        zeros = ops.prune_per_row(weights, params.sparsity, [t.row_dim for t in targets])
    per_layer = {t.name: round(z / t.weight.numel(), 6) for t, z in zip(targets, zeros, strict=True)}
    zeros = sum(zeros)
    return {
        "target_parameters": total,
        "target_zeros": zeros,
        "achieved_sparsity": zeros / total,
        "requested_sparsity": params.sparsity,
        "threshold": params.threshold,
        "layers": len(targets),
        "per_layer_sparsity": per_layer,
    }
