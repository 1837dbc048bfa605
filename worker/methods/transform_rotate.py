"""``transform.rotate``: the handler (core/methods/transform_rotate.py has the method's parameters,
checks and description).

llm-compressor's ``SpinQuantModifier`` / ``QuIPModifier`` do the work; they are driven through
their own lifecycle (initialize, calibration start and end, finalize) rather than ``oneshot``,
which would look for a tokenizer and a dataset a rotation does not need."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.transform_rotate import RUNTIMES, TransformRotateParams
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel

# Random ids the rotated model is compared with the original on (its function must not change).
CHECK_TOKENS = 16


def _modifier(params: TransformRotateParams) -> Any:
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    if params.style == "quip":
        return QuIPModifier(
            rotations=["v"],
            transform_type=params.transform_type,
            transform_block_size=params.block_size,
            ignore=params.ignore,
        )

    class _SpinQuant(SpinQuantModifier):  # type: ignore[misc]
        # llm-compressor centres the embeddings first: exact before a LayerNorm (which subtracts
        # the mean), but these models normalise with RMSNorm, where it changes every output.
        def _center_embeddings(self, model: Any) -> None:
            return None

    return _SpinQuant(
        rotations=["R1", "R2"], transform_type=params.transform_type, transform_block_size=params.block_size
    )


def _logits(module: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return module(input_ids=ids).logits.float()


@handler("transform.rotate")
def transform_rotate(model: LoadedModel, params: TransformRotateParams, ctx: MethodContext) -> Metrics:
    """Hadamard rotations (SpinQuant fused, or QuIP online) that make the following quantizer lose less."""
    import torch
    from llmcompressor.core import Event, EventType, State

    module = model.module
    if module is None:
        raise ValueError("transform.rotate needs a transformers model directory (config.json), not a bare state dict")
    vocab = int(getattr(module.config, "vocab_size", 0) or 2)
    ids = torch.randint(0, vocab, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    device = next(module.parameters()).device
    before = _logits(module, ids.to(device))
    linears_before = {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    tied = bool(getattr(module.config, "tie_word_embeddings", False))

    mod = _modifier(params)
    state = State(model=module)
    try:
        mod.initialize(state)
        mod.update_event(state, Event(type_=EventType.CALIBRATION_START))
        mod.update_event(state, Event(type_=EventType.CALIBRATION_END))
        mod.finalize(state)
    except ValueError as e:
        # e.g. a width no Hadamard matrix of this type exists for (checked at submit from config.json).
        raise ValueError(f"transform.rotate ({params.style}, {params.transform_type}): {e}") from e

    from compressed_tensors.transform import TransformBase

    online = sorted({n.rsplit(".", 1)[0] for n, m in module.named_modules() if isinstance(m, TransformBase)})
    if params.style == "spinquant":
        # Every rotation was fused into the weights: nothing is left to record in the artifact,
        # which must stay an ordinary model (a runtime would otherwise look for online rotations).
        if online:
            raise RuntimeError(f"transform.rotate spinquant left online transforms on {online[:3]}")
        if hasattr(module, "transform_config"):
            del module.transform_config
    after = _logits(module, ids.to(device))
    diff = float((after - before).abs().max())
    scale = float(before.abs().max()) or 1.0
    model.notes["rotation"] = f"{params.style} ({params.transform_type}) rotations " + (
        "fused into the weights: an ordinary model"
        if params.style == "spinquant"
        else "run online on every rotated layer's input: vLLM runs them; transformers 5.17 ignores the "
        "transform_config and would compute wrong outputs"
    )
    return {
        "style": params.style,
        "rotations": ["R1", "R2"] if params.style == "spinquant" else ["v"],
        "transform_type": params.transform_type,
        "block_size": params.block_size,
        "online_layers": len(online),
        "untied_embeddings": tied and params.style == "spinquant",
        "linear_layers": len(linears_before),
        # The rotation must not change the function: the largest logit difference on random ids,
        # relative to the largest logit (float rounding of the fused weights; ~1e-6 in float32).
        "logits_max_abs_diff": diff,
        "logits_max_rel_diff": diff / scale,
        "runtimes": RUNTIMES[params.style],
    }
