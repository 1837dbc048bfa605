"""Magnitude pruning math.

The global threshold is found without concatenating the weights (the study's recipe,
``torch.nn.utils.prune.global_unstructured``, builds a copy of every target weight plus masks,
several GB for a 124M-parameter model). Instead, passes over fixed-size chunks histogram ``|w|``
to narrow the interval that holds the k-th smallest magnitude, then the few values left in that
interval are gathered and the exact k-th value is taken. Extra memory is a few chunk-sized
buffers whatever the model size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

CHUNK = 1 << 20  # elements per chunk: bounds temporary memory to a few MB
BINS = 4096
EXACT_GATHER = 1 << 20  # gather candidates once the interval holds at most this many values


def _chunks(weights: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    for w in weights:
        flat = w.detach().reshape(-1)
        for s in range(0, flat.numel(), CHUNK):
            yield flat[s : s + CHUNK]


def kth_smallest_abs(weights: Sequence[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| (1-based) over all tensors, exactly, in bounded memory."""
    total = sum(w.numel() for w in weights)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    lo = 0.0
    hi = max(float(w.detach().abs().max()) for w in weights if w.numel())
    below = 0  # number of values strictly below lo
    for _ in range(8):
        width = hi - lo
        if width <= 0:
            return lo
        counts = torch.zeros(BINS, dtype=torch.float64)
        in_range = 0
        for c in _chunks(weights):
            a = c.abs().float()
            # histc drops values outside [lo, hi]; values == hi land in the last bin.
            counts += torch.histc(a, bins=BINS, min=lo, max=hi).double()
        in_range = int(counts.sum())
        cum = torch.cumsum(counts, 0)
        need = k - below
        j = int(torch.searchsorted(cum, torch.tensor(float(need), dtype=torch.float64)))
        j = min(j, BINS - 1)
        new_lo = lo + width * j / BINS
        new_hi = lo + width * (j + 1) / BINS
        if counts[j] <= EXACT_GATHER or in_range <= EXACT_GATHER:
            # Exact pass: count values below the interval and gather those inside it. Bin edges
            # computed by histc and by us may differ by an ulp, so the counts are redone here.
            lo_e, hi_e = new_lo, new_hi
            below_e = 0
            cands = []
            for c in _chunks(weights):
                a = c.abs().float()
                below_e += int((a < lo_e).sum())
                m = (a >= lo_e) & (a <= hi_e)
                if m.any():
                    cands.append(a[m])
            idx = k - below_e
            if cands:
                vals = torch.cat(cands)
                if 1 <= idx <= vals.numel():
                    return float(torch.kthvalue(vals, idx).values)
            # Edge disagreement pushed the k-th value just outside: widen and retry.
            lo = max(0.0, lo_e - width / BINS)
            hi = hi_e + width / BINS
            below = sum(int((c.abs().float() < lo).sum()) for c in _chunks(weights))
            continue
        below += int(cum[j - 1]) if j > 0 else 0
        lo, hi = new_lo, new_hi
    raise RuntimeError("threshold search did not converge")


def prune_below(weights: Sequence[torch.Tensor], threshold: float, inclusive: bool) -> int:
    """Zero |w| < threshold (or <= with ``inclusive``) in place; return the number of zeros after."""
    zeros = 0
    for w in weights:
        flat = w.data.view(-1) if w.is_contiguous() else None
        if flat is None:
            mask = w.abs() <= threshold if inclusive else w.abs() < threshold
            w.data.masked_fill_(mask, 0)
        else:
            for s in range(0, flat.numel(), CHUNK):
                c = flat[s : s + CHUNK]
                a = c.abs()
                c.masked_fill_(a <= threshold if inclusive else a < threshold, 0)
        zeros += int((w == 0).sum())
    return zeros


def prune_global(weights: Sequence[torch.Tensor], sparsity: float) -> int:
    total = sum(w.numel() for w in weights)
    k = round(sparsity * total)
    if k == 0:
        return sum(int((w == 0).sum()) for w in weights)
    t = kth_smallest_abs(weights, k)
    return prune_below(weights, t, inclusive=True)


def prune_per_tensor(weights: Sequence[torch.Tensor], sparsity: float) -> int:
    zeros = 0
    for w in weights:
        k = round(sparsity * w.numel())
        if k:
            t = float(torch.kthvalue(w.detach().abs().reshape(-1).float(), k).values)
            zeros += prune_below([w], t, inclusive=True)
        else:
            zeros += int((w == 0).sum())
    return zeros


def prune_per_row(weights: Sequence[torch.Tensor], sparsity: float, row_dim: Sequence[int]) -> int:
    """Prune the same fraction from every output row; ``row_dim`` says which dim indexes outputs
    (0 for nn.Linear's [out, in], 1 for GPT-2 Conv1D's [in, out])."""
    zeros = 0
    for w, d in zip(weights, row_dim, strict=True):
        rows = w.data if d == 0 else w.data.t()
        n = rows.shape[1]
        k = round(sparsity * n)
        if k:
            idx = rows.abs().topk(k, dim=1, largest=False).indices
            rows.scatter_(1, idx, 0)
        zeros += int((w == 0).sum())
    return zeros
