"""``prune.wanda``: the handler (core/methods/prune_wanda.py has the method's parameters, checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.methods.prune_wanda import PruneWandaParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@handler("prune.wanda")
def prune_wanda(model: LoadedModel, params: PruneWandaParams, ctx: MethodContext) -> Metrics:
    """Wanda: prune by |weight| x input-activation norm on calibration data (llm-compressor)."""
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    from worker import llmc

    before = llmc.linear_zeros(model)
    mod = WandaPruningModifier(
        sparsity=params.target_sparsity,
        mask_structure=params.mask or "0:0",
        ignore=llmc.prune_ignore(model, params.ignore),
    )
    run = llmc.run_oneshot(model, ctx, [mod], params)
    return {**llmc.record_sparsity(model, "prune.wanda", params.target_sparsity, params.mask, before), **run}
