"""``prune.sparsegpt``: the handler (core/methods/prune_sparsegpt.py has the method's parameters,
checks and description)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.methods.prune_sparsegpt import PruneSparseGPTParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@handler("prune.sparsegpt")
def prune_sparsegpt(model: LoadedModel, params: PruneSparseGPTParams, ctx: MethodContext) -> Metrics:
    """SparseGPT: one-shot pruning with second-order weight updates on calibration data (llm-compressor)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    from worker import llmc

    before = llmc.linear_zeros(model)
    mod = SparseGPTModifier(
        sparsity=params.target_sparsity,
        mask_structure=params.mask or "0:0",
        dampening_frac=params.dampening_frac,
        block_size=params.block_size,
        ignore=llmc.prune_ignore(model, params.ignore),
    )
    run = llmc.run_oneshot(model, ctx, [mod], params)
    return {**llmc.record_sparsity(model, "prune.sparsegpt", params.target_sparsity, params.mask, before), **run}
