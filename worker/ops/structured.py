"""Structured pruning math: score features (FFN neurons, attention head groups) by weight norms,
pick the ones to drop, and physically shrink ``nn.Linear`` / GPT-2 ``Conv1D`` layers.

Layouts: ``nn.Linear.weight`` is ``[out, in]``; GPT-2's ``Conv1D.weight`` is ``[in, out]``. The
callers speak of a layer's *side* (``"out"``: the features it produces, ``"in"``: the features it
reads) so that they never deal with the layouts; :func:`feature_dim` maps a side to a weight dim.

Norms are computed in float32 whatever the weight dtype: half-precision sums of squares over a
few thousand values lose the ordering of close scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Norm = Literal["l1", "l2"]
Side = Literal["out", "in"]


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def feature_dim(module: nn.Module, side: Side) -> int:
    """The weight dim that indexes ``side`` features of a Linear ([out, in]) or Conv1D ([in, out])."""
    if _is_conv1d(module):
        return 1 if side == "out" else 0
    if isinstance(module, nn.Linear):
        return 0 if side == "out" else 1
    raise TypeError(f"cannot slice a {type(module).__name__}: only nn.Linear and Conv1D")


def features(module: nn.Module, side: Side) -> int:
    return module.weight.shape[feature_dim(module, side)]


def group_norms(
    weight: torch.Tensor, dim: int, norm: Norm, group_size: int = 1, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """One norm per group of ``group_size`` consecutive indices along ``dim`` of a 2-D weight.

    With ``group_size=1`` that is the norm of each row (``dim=0``) or column (``dim=1``). A bias
    indexed by the same features is part of its feature's vector (a weight on a constant input).
    ``l1`` sums absolute values, ``l2`` is the Euclidean (Frobenius, for a group) norm.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if dim == 1:
        w = w.t()
    n = w.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} features do not split into groups of {group_size}")
    w = w.contiguous().reshape(n // group_size, -1)
    parts = [w]
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match {n} features")
        parts.append(bias.detach().float().reshape(n // group_size, group_size))
    if norm == "l1":
        return sum(p.abs().sum(dim=1) for p in parts)
    if norm == "l2":
        return torch.sqrt(sum(p.square().sum(dim=1) for p in parts))
    raise ValueError(f"unknown norm {norm!r}")


def module_norms(module: nn.Module, side: Side, norm: Norm, group_size: int = 1) -> torch.Tensor:
    """:func:`group_norms` of a layer's ``side`` features; the bias counts on the ``out`` side only
    (on the ``in`` side it is indexed by the other features)."""
    bias = module.bias if side == "out" else None
    return group_norms(module.weight, feature_dim(module, side), norm, group_size, bias)


def product_scores(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise product of per-feature norms. A product, not a sum: a neuron whose output
    column (or one of its gating rows) is zero contributes nothing, whatever its other weights,
    and must score zero."""
    if not factors:
        raise ValueError("no factors")
    out = factors[0].clone()
    for f in factors[1:]:
        if f.shape != out.shape:
            raise ValueError(f"score shapes differ: {tuple(out.shape)} vs {tuple(f.shape)}")
        out = out * f
    return out


def keep_indices(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices (ascending) of the features kept when the ``n_remove`` lowest-scoring ones go.

    Ties go by index (a stable sort), so the same weights always give the same result; the
    ascending order keeps the survivors in their original order, which heads need (query head
    ``h`` reads key-value head ``h // group``).
    """
    n = scores.numel()
    if not 0 <= n_remove < n:
        raise ValueError(f"cannot remove {n_remove} of {n} features (at least one must stay)")
    order = torch.argsort(scores.reshape(-1), stable=True)
    return torch.sort(order[n_remove:]).values


def expand_groups(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Member indices of groups of ``group_size`` consecutive indices: groups [0, 2] of size 3 ->
    [0, 1, 2, 6, 7, 8]. Turns kept heads into kept rows (``group_size=head_dim``) and kept
    key-value groups into kept query heads (``group_size=num_attention_heads // num_kv_heads``)."""
    offsets = torch.arange(group_size, device=groups.device)
    return (groups.reshape(-1, 1) * group_size + offsets).reshape(-1)


@torch.no_grad()
def shrink(module: nn.Module, index: torch.Tensor, side: Side) -> None:
    """Keep only the ``index`` features of ``side`` of a Linear or Conv1D, in place: new, smaller
    weight (and, on the ``out`` side, bias) parameters, and the size attributes its forward or
    repr reads (``in_features``/``out_features``; Conv1D's ``nf``/``nx``)."""
    dim = feature_dim(module, side)
    index = index.to(device=module.weight.device, dtype=torch.long)
    n = module.weight.shape[dim]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise IndexError(f"index out of range for {n} features")
    w = module.weight
    module.weight = nn.Parameter(w.index_select(dim, index).contiguous(), requires_grad=w.requires_grad)
    if side == "out" and module.bias is not None:
        b = module.bias
        module.bias = nn.Parameter(b.index_select(0, index).contiguous(), requires_grad=b.requires_grad)
    k = index.numel()
    if _is_conv1d(module):
        if side == "out":
            module.nf = k
        else:
            module.nx = k
    elif side == "out":
        module.out_features = k
    else:
        module.in_features = k
