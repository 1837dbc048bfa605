"""``prune.structured``: the handler (core/methods/prune_structured.py has the method's parameters,
checks and description)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from core.methods.prune_structured import (
    Heads,
    PruneStructuredParams,
    checked_removal,
    family_of,
    head_layout,
    heads_removal,
)
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


@dataclass
class _Ffn:
    name: str
    inputs: list[Any]  # layers whose "out" features are the neurons
    outputs: list[Any]  # layers whose "in" features are the neurons


def _ffn_blocks(module: Any, kind: str) -> list[_Ffn]:
    out = []
    for name, mod in module.named_modules():
        if kind == "conv1d" and hasattr(mod, "c_fc") and hasattr(mod, "c_proj"):
            out.append(_Ffn(name, [mod.c_fc], [mod.c_proj]))
        elif (
            kind == "bert"
            and hasattr(getattr(mod, "intermediate", None), "dense")
            and hasattr(getattr(mod, "output", None), "dense")
        ):
            out.append(_Ffn(name, [mod.intermediate.dense], [mod.output.dense]))
        elif kind == "gated" and all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
            out.append(_Ffn(name, [mod.gate_proj, mod.up_proj], [mod.down_proj]))
    return out


def _attention_blocks(module: Any) -> list[tuple[str, Any]]:
    return [
        (n, m)
        for n, m in module.named_modules()
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ]


def _parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts tied weights once


# One layer a module plays a part in: (the module's name, the module, the side of it whose
# features are the unit's, and group sizes). For a score factor the group size is how many
# consecutive features make one of the unit's groups; for a cut, the sizes that expand the kept
# groups into kept features (``ops.expand_groups`` applied in turn).
_Part = tuple[str, Any, Literal["out", "in"], tuple[int, ...]]


@dataclass
class _Unit:
    """One layer's prunable groups: a feed-forward block's neurons or an attention block's
    key-value head groups. The ``remove`` lowest-scoring go, the score being the product of the
    ``factors``' norms; every layer in ``cuts`` loses the features of the groups that go."""

    kind: Literal["ffn", "heads"]
    name: str  # the block module's name
    remove: int
    factors: list[_Part]
    cuts: list[_Part]


@dataclass
class _Plan:
    """What the request does to this model, decided from its structure and config alone (no
    weight is read): both paths start from it, the in-memory handler on the model, the streaming
    step on the meta skeleton."""

    layers: int
    units: list[_Unit]
    config: dict[str, int]  # the config fields that change, and their new values
    ffn: tuple[int, int] | None  # (neurons per layer, removed per layer)
    heads: tuple[Heads, int] | None  # (layout, key-value groups removed per layer)


def _plan(m: Any, params: PruneStructuredParams) -> _Plan:
    """Every check before the first change (a refusal must not leave a half-pruned model), and
    the units to prune, FFN blocks first, then attention blocks."""
    cfg = m.config
    fam = family_of(getattr(cfg, "model_type", None))
    n_layers = cfg.num_hidden_layers
    ffn_blocks = _ffn_blocks(m, fam.mlp) if params.ffn > 0 else []
    attn_blocks = _attention_blocks(m) if params.heads > 0 else []
    # Every layer or none: a partial match would leave weights the config no longer describes.
    if params.ffn > 0 and len(ffn_blocks) != n_layers:
        raise ValueError(f"found {len(ffn_blocks)} feed-forward blocks for {n_layers} layers")
    if params.heads > 0:
        if not fam.heads:
            raise ValueError(f"'heads' is not supported for {cfg.model_type} models")
        if len(attn_blocks) != n_layers:
            raise ValueError(f"found {len(attn_blocks)} attention blocks for {n_layers} layers")
    names = {id(mod): name for name, mod in m.named_modules()}
    units: list[_Unit] = []
    changes: dict[str, int] = {}
    ffn = heads = None
    if ffn_blocks:
        ffn = _ffn_units(cfg, fam, ffn_blocks, names, params, units, changes)
    if attn_blocks:
        heads = _head_units(cfg, fam, attn_blocks, names, params, units, changes)
    return _Plan(n_layers, units, changes, ffn, heads)


def _ffn_units(
    cfg: Any,
    fam: Any,
    ffn_blocks: list[Any],
    names: dict[int, str],
    params: PruneStructuredParams,
    units: list[_Unit],
    changes: dict[str, int],
) -> tuple[int, int]:
    """The feed-forward blocks' units (appended to ``units``, the config change to ``changes``)
    once their widths match the config; (neurons per layer, removed per layer)."""
    from worker.ops import structured as ops

    n = ops.features(ffn_blocks[0].inputs[0], "out")
    cfg_n = getattr(cfg, fam.ffn_key, None) or (4 * cfg.hidden_size if fam.ffn_key == "n_inner" else None)
    widths = {ops.features(x, "out") for b in ffn_blocks for x in b.inputs} | {
        ops.features(x, "in") for b in ffn_blocks for x in b.outputs
    }
    if widths != {n} or cfg_n != n:
        raise ValueError(f"feed-forward widths {sorted(widths)} do not match the config's {fam.ffn_key}={cfg_n}")
    remove = checked_removal(params.ffn, n, "ffn", "feed-forward neurons")
    for b in ffn_blocks:
        parts = [(names[id(x)], x, "out", (1,)) for x in b.inputs] + [(names[id(x)], x, "in", (1,)) for x in b.outputs]
        units.append(_Unit("ffn", b.name, remove, factors=parts, cuts=[(nm, x, side, ()) for nm, x, side, _ in parts]))
    changes[fam.ffn_key] = n - remove
    return n, remove


def _head_units(
    cfg: Any,
    fam: Any,
    attn_blocks: list[tuple[str, Any]],
    names: dict[int, str],
    params: PruneStructuredParams,
    units: list[_Unit],
    changes: dict[str, int],
) -> tuple[Heads, int]:
    """The attention blocks' units (appended to ``units``, the config changes to ``changes``)
    once their q/k/v/o widths match the config's heads; (layout, key-value groups removed)."""
    from worker.ops import structured as ops

    lay = head_layout(
        {
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
            "head_dim": getattr(cfg, "head_dim", None),
        }
    )
    for name, a in attn_blocks:
        shapes = (
            ops.features(a.q_proj, "out"),
            ops.features(a.k_proj, "out"),
            ops.features(a.v_proj, "out"),
            ops.features(a.o_proj, "in"),
        )
        q, kv = lay.n_heads * lay.head_dim, lay.n_kv * lay.head_dim
        if shapes != (q, kv, kv, q):
            raise ValueError(f"{name}: q/k/v/o widths {shapes} do not match the config's heads ({(q, kv, kv, q)})")
    remove = heads_removal(params.heads, lay, fam)
    q_rows, kv_rows = (lay.group, lay.head_dim), (lay.head_dim,)
    for name, a in attn_blocks:
        factors = [
            (names[id(a.v_proj)], a.v_proj, "out", (lay.head_dim,)),
            (names[id(a.o_proj)], a.o_proj, "in", (lay.group * lay.head_dim,)),
        ]
        cuts = [
            (names[id(a.q_proj)], a.q_proj, "out", q_rows),
            (names[id(a.k_proj)], a.k_proj, "out", kv_rows),
            (names[id(a.v_proj)], a.v_proj, "out", kv_rows),
            (names[id(a.o_proj)], a.o_proj, "in", q_rows),
        ]
        units.append(_Unit("heads", name, remove, factors=factors, cuts=cuts))
    kept_kv = lay.n_kv - remove
    changes["num_attention_heads"] = kept_kv * lay.group
    changes["num_key_value_heads"] = kept_kv
    # Explicit: with fewer heads, hidden_size // num_attention_heads is no longer the head size.
    changes["head_dim"] = lay.head_dim
    return lay, remove


def _norms(module: Any, side: Literal["out", "in"], norm: str, group: int, weight: Any, bias: Any) -> Any:
    """One factor of a unit's score: the norm of each group of ``side`` features of the layer,
    from its weight (and bias, which counts on the ``out`` side only: on the ``in`` side it is
    indexed by the other features). ``weight``/``bias`` are the module's own in memory, the
    checkpoint's tensors when streaming; ``module`` only says its layout (Linear or Conv1D)."""
    from worker.ops import structured as ops

    return ops.group_norms(weight, ops.feature_dim(module, side), norm, group, bias if side == "out" else None)  # type: ignore[arg-type]


def _keep(norms: list[Any], remove: int) -> Any:
    """The kept groups (ascending) of a unit from its factors' norms."""
    from worker.ops import structured as ops

    return ops.keep_indices(ops.product_scores(norms), remove)


def _expand(keep: Any, sizes: tuple[int, ...]) -> Any:
    from worker.ops import structured as ops

    for s in sizes:
        keep = ops.expand_groups(keep, s)
    return keep


def _metrics(plan: _Plan, params: PruneStructuredParams, keeps: list[Any], before: int, after: int) -> dict[str, Any]:
    ffn_report = heads_report = None
    if plan.ffn is not None:
        n, remove = plan.ffn
        ffn_report = {
            "requested_fraction": params.ffn,
            "achieved_fraction": remove / n,
            "removed_per_layer": remove,
            "neurons_before": n,
            "neurons_after": n - remove,
            "per_layer": {u.name: {"before": n, "after": n - remove} for u in plan.units if u.kind == "ffn"},
        }
    if plan.heads is not None:
        lay, remove = plan.heads
        kept_kv = lay.n_kv - remove
        heads_report = {
            "requested_fraction": params.heads,
            "achieved_fraction": remove / lay.n_kv,
            "heads_before": lay.n_heads,
            "heads_after": kept_kv * lay.group,
            "kv_heads_before": lay.n_kv,
            "kv_heads_after": kept_kv,
            "head_dim": lay.head_dim,
            "per_layer": {
                u.name: {
                    "heads_before": lay.n_heads,
                    "heads_after": kept_kv * lay.group,
                    "kv_heads_before": lay.n_kv,
                    "kv_heads_after": kept_kv,
                    "kept_kv_heads": keep.tolist(),
                }
                for u, keep in zip(plan.units, keeps, strict=True)
                if u.kind == "heads"
            },
        }
    return {
        "norm": params.norm,
        "layers": plan.layers,
        "ffn": ffn_report,
        "heads": heads_report,
        "parameters_before": before,
        "parameters_after": after,
        "parameters_removed_fraction": round((before - after) / before, 6) if before else 0.0,
    }


def _stream(params: PruneStructuredParams, ctx: Any) -> Any:
    return _stream_step_class()(params)


# Per shrunk tensor of the streaming form: (the dim its features are on, its shape before and
# after, the unit, the expansion from kept groups to kept features).
_Cut = tuple[int, tuple[int, ...], tuple[int, ...], int, tuple[int, ...]]


def _stream_cuts(skeleton: Any, plan: _Plan) -> tuple[dict[str, _Cut], int]:
    """Every tensor the plan shrinks, with its cut; and the number of parameters removed.
    Raises NotStreamable for a tensor tied to another module or cut by two units."""
    from worker.ops import structured as ops
    from worker.stream import NotStreamable

    cuts: dict[str, _Cut] = {}
    removed = 0
    shared: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    for k, u in enumerate(plan.units):
        for name, mod, side, sizes in u.cuts:
            dim = ops.feature_dim(mod, side)
            kept = mod.weight.shape[dim] - u.remove * math.prod(sizes)
            tensors = [("weight", dim)] + ([("bias", 0)] if side == "out" and mod.bias is not None else [])
            for attr, d in tensors:
                p = getattr(mod, attr)
                key = f"{name}.{attr}"
                if len(shared[id(p)]) > 1 or key in cuts:
                    # Tied to another module, or cut by two units: the streaming form shrinks
                    # each stored tensor once, for one layer.
                    raise NotStreamable(f"prune.structured: {key} is shared ({shared[id(p)]})")
                shape = tuple(p.shape)
                cuts[key] = (d, shape, shape[:d] + (kept,) + shape[d + 1 :], k, sizes)
                removed += p.numel() - math.prod(cuts[key][2])
    return cuts, removed


def _check_checkpoint(cuts: dict[str, _Cut], source: Any, at: dict[str, int]) -> None:
    """Every tensor to cut is in the checkpoint, with the module's shape (else NotStreamable)."""
    from worker.stream import NotStreamable

    for key, (_, shape, _, _, _) in cuts.items():
        if key not in at:
            raise NotStreamable(f"prune.structured: {key} is not a tensor of the checkpoint")
        if source.spec(at[key]).shape != shape:
            raise NotStreamable(
                f"prune.structured: {key} is {source.spec(at[key]).shape} in the checkpoint, {shape} in the module"
            )


def _stream_norms(
    plan: _Plan, params: PruneStructuredParams, cuts: dict[str, _Cut], source: Any, at: dict[str, int]
) -> dict[tuple[int, int], Any]:
    """The per-feature norms of every unit's scored factors, keyed (unit, factor): the scored
    weights read once each in checkpoint order, only their norms kept. Their biases (a few KB) are
    read first: a bias is part of its feature's vector."""
    factor_of: dict[str, list[tuple[int, int]]] = {}
    for k, u in enumerate(plan.units):
        for j, (name, _, _, _) in enumerate(u.factors):
            factor_of.setdefault(f"{name}.weight", []).append((k, j))
    biases = {n: source[at[n]].clone() for n in cuts if n.endswith(".bias")}
    norms: dict[tuple[int, int], Any] = {}
    for i, w in source.subset(sorted(at[n] for n in factor_of)):
        for k, j in factor_of[source.names[i]]:
            name, mod, side, (group,) = plan.units[k].factors[j]
            norms[k, j] = _norms(mod, side, params.norm, group, w, biases.get(f"{name}.bias"))
        del w
    return norms


@functools.cache
def _stream_step_class() -> type:
    """The streaming form's class, made on first use: its base (worker.stream) imports torch,
    which this module must not at import time (the API imports the method registry)."""
    import torch

    from worker.stream import Source, StreamStep, Target, TensorSpec

    class PruneStructuredStep(StreamStep):
        """prune.structured without building the model (see the module docstring for the math).

        ``bind`` makes the plan on the meta skeleton (the same ``_plan`` as the in-memory
        handler, so the same checks and refusals) and from it every shrunk tensor's new shape:
        the weights and ``out``-side biases of every layer a unit cuts. ``prepare`` reads the
        scored weights once (FFN inputs and outputs, ``v_proj`` and ``o_proj``), keeps only their
        per-feature norms, and picks the kept features with the same ``_norms``/``_keep`` as the
        handler. ``rows`` then copies the kept rows of each row chunk (features along dim 0:
        Linear inputs, q/k/v, biases, Conv1D ``c_proj``) or the kept columns of it (along dim 1:
        ``down_proj``/``o_proj``/``output.dense``, Conv1D ``c_fc``): ``index_select`` as
        ``ops.shrink`` does, so the result is bit for bit the in-memory one."""

        # The scores must see the weights as the steps before leave them (a per-layer magnitude
        # prune's values exist only while its tensor streams): a pass of its own starts here.
        needs_prepass = True

        def __init__(self, params: PruneStructuredParams) -> None:
            self.params = params
            self.plan: _Plan | None = None
            self.cuts: dict[str, _Cut] = {}
            self.index: dict[str, torch.Tensor] = {}
            self.keeps: list[torch.Tensor] = []
            self.before = 0
            self.removed = 0
            self.notes = {}

        def bind(self, skeleton: Any, targets: dict[str, Target]) -> None:
            if skeleton is None:
                raise ValueError("prune.structured needs a transformers model, not a bare state dict")
            self.plan = _plan(skeleton, self.params)
            self.before = _parameters(skeleton)
            self.cuts, self.removed = _stream_cuts(skeleton, self.plan)

        def select(self, spec: TensorSpec, target: Target | None) -> bool:
            return spec.name in self.cuts

        def out_shape(self, spec: TensorSpec, target: Target | None) -> tuple[int, ...]:
            return self.cuts[spec.name][2] if spec.name in self.cuts else spec.shape

        def prepare(self, source: Source) -> None:
            assert self.plan is not None
            at = {n: i for i, n in enumerate(source.names)}
            _check_checkpoint(self.cuts, source, at)
            norms = _stream_norms(self.plan, self.params, self.cuts, source, at)
            self.keeps = [
                _keep([norms[k, j] for j in range(len(u.factors))], u.remove) for k, u in enumerate(self.plan.units)
            ]
            for key, (_, _, _, k, sizes) in self.cuts.items():
                self.index[key] = _expand(self.keeps[k], sizes)

        def rows(
            self, spec: TensorSpec, target: Target | None, x: torch.Tensor, r0: int, record: bool = True
        ) -> torch.Tensor:
            dim = self.cuts[spec.name][0]
            index = self.index[spec.name]
            if dim == 1:
                return x.index_select(1, index)
            # The kept features that fall in this chunk's rows r0 .. r0 + len(x) (ascending:
            # two binary searches), as offsets into the chunk. A chunk may keep none of its rows.
            a, b = (int(v) for v in torch.searchsorted(index, torch.tensor([r0, r0 + x.shape[0]])))
            return x.index_select(0, index[a:b] - r0)

        def update_config(self, config: dict[str, Any]) -> None:
            assert self.plan is not None
            config.update(self.plan.config)

        def metrics(self) -> dict[str, Any]:
            assert self.plan is not None
            return _metrics(self.plan, self.params, self.keeps, self.before, self.before - self.removed)

    return PruneStructuredStep


@handler("prune.structured", stream=_stream)
def prune_structured(model: LoadedModel, params: PruneStructuredParams, ctx: MethodContext) -> Metrics:
    """Structured pruning: remove whole FFN neurons and attention heads, shrinking matrices and config."""
    from worker.ops import structured as ops

    if model.module is None:
        raise ValueError("prune.structured needs a transformers model, not a bare state dict")
    m = model.module
    plan = _plan(m, params)
    before = _parameters(m)
    keeps = []
    for k, u in enumerate(plan.units):
        keep = _keep(
            [_norms(mod, side, params.norm, group, mod.weight, mod.bias) for _, mod, side, (group,) in u.factors],
            u.remove,
        )
        for _, mod, side, sizes in u.cuts:
            ops.shrink(mod, _expand(keep, sizes), side)
        keeps.append(keep)
        if ctx is not None:  # None when called outside a job, as the other handlers allow
            ctx.step_progress(f"{u.kind} {u.name}", (k + 1) / len(plan.units))
    for key, value in plan.config.items():
        setattr(m.config, key, value)
    return _metrics(plan, params, keeps, before, _parameters(m))
