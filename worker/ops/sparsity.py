"""Magnitude pruning math.

The global threshold is found without concatenating the weights (the study's recipe,
``torch.nn.utils.prune.global_unstructured``, builds a copy of every target weight plus masks:
several GB for a 124M-parameter model).

For 16-bit weights (bf16, fp16: what checkpoints are) it is one counting pass: a non-negative
float's bit pattern orders like its value, and ``|w|``'s pattern is the weight's 16 bits without
the sign, so a histogram of those 32,768 patterns (``torch.bincount``) *is* the sorted list of
magnitudes, and the k-th smallest is read off its cumulative counts, exactly. float32 weights
take two passes: the same histogram of the top 15 bits of ``|w|``'s pattern finds the bucket
holding the k-th value, and a second pass gathers that bucket's values (a 1/128-octave slice)
to take the exact k-th among them. Other cases (mixed dtypes, a bucket too crowded to gather)
use the general search:

1. a strided sample of ~256K magnitudes gives the k-th value's rank interval with a safety margin
   of 6 standard errors of the sample quantile (~sqrt(p(1-p)/n)): a miss is rare and only costs
   the fallback below;
2. one pass over fixed-size chunks counts the values below that interval exactly and gathers the
   few inside it, and the exact k-th value is taken among those;
3. when the interval holds too many values to gather, or the k-th value is outside it (it should
   never be), a histogram of 65,536 bins over that interval, built in one counting pass, narrows
   it to a few bins, and one more pass gathers those values.

The counting passes run one chunk per core (worker/ops/parallel.py). Extra memory is a few
chunk-sized buffers per core plus the gathered values, whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from worker.ops import parallel

CHUNK = 1 << 20  # elements per chunk: bounds temporary memory to a few MB
BINS = 1 << 16
SAMPLE = 1 << 18  # 1 MB of fp32: the k-th value within ~±0.8% of ranks
EXACT_GATHER = 1 << 22  # most candidate values gathered in one exact pass (16 MB of fp32)
PATTERNS = 1 << 15  # |w|'s bit patterns (16-bit floats) or top bits (float32) counted
BUCKET_GATHER = 1 << 25  # most float32 values gathered from one bucket (128 MB)
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _chunks(weights: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    for w in weights:
        flat = w.detach().reshape(-1)
        for s in range(0, flat.numel(), CHUNK):
            yield flat[s : s + CHUNK]


def _sample(weights: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    step = max(1, total // SAMPLE)
    parts = [w.detach().reshape(-1)[::step].abs().float() for w in weights if w.numel()]
    return torch.cat(parts).sort().values


class _Buffers:
    """Chunk-sized scratch tensors reused across chunks: allocating fresh temporaries per chunk
    lets the allocator's free lists grow the resident set well past one chunk."""

    def __init__(self) -> None:
        self.a = torch.empty(CHUNK, dtype=torch.float32)
        self.m1 = torch.empty(CHUNK, dtype=torch.bool)
        self.m2 = torch.empty(CHUNK, dtype=torch.bool)

    def abs(self, c: torch.Tensor) -> torch.Tensor:
        a = self.a[: c.numel()]
        a.copy_(c)  # also converts fp16/bf16 to fp32
        return a.abs_()


def _exact_in(weights: Sequence[torch.Tensor], k: int, lo: float, hi: float) -> float | None:
    """One pass: the k-th smallest |w| if it lies in [lo, hi] (and the interval is not too
    crowded), else None."""
    below = 0
    cands = []
    n_cands = 0
    buf = _Buffers()
    for c in _chunks(weights):
        a = buf.abs(c)
        m1, m2 = buf.m1[: a.numel()], buf.m2[: a.numel()]
        torch.lt(a, lo, out=m1)
        below += int(torch.count_nonzero(m1))
        torch.ge(a, lo, out=m1)
        torch.le(a, hi, out=m2)
        m1.logical_and_(m2)
        inside = a[m1]
        n_cands += inside.numel()
        if n_cands > EXACT_GATHER:
            return None
        if inside.numel():
            cands.append(inside)
    idx = k - below
    if not cands or not 1 <= idx <= n_cands:
        return None
    return float(torch.kthvalue(torch.cat(cands), idx).values)


def _narrow(weights: Sequence[torch.Tensor], k: int, lo: float = 0.0, hi: float = math.inf) -> float:
    """Histogram narrowing inside [lo, hi] (the whole range when the sample gave none), then an
    exact pass once the interval is small. Each narrowing pass counts the values below ``lo``
    itself, so histc's bin-edge rounding never shifts a rank."""
    if not math.isfinite(hi):
        hi = max(float(w.detach().abs().max()) for w in weights if w.numel())
    buf = _Buffers()
    for _ in range(16):
        if hi <= lo:
            return lo
        counts = torch.zeros(BINS, dtype=torch.float64)
        below = 0
        for c in _chunks(weights):
            a = buf.abs(c)
            m = buf.m1[: a.numel()]
            torch.lt(a, lo, out=m)
            below += int(torch.count_nonzero(m))
            counts += torch.histc(a, bins=BINS, min=lo, max=hi).double()
        if not below < k <= below + counts.sum():
            # The k-th value is outside [lo, hi] (the sample's interval missed): the whole range.
            lo, hi = 0.0, max(float(w.detach().abs().max()) for w in weights if w.numel())
            continue
        cum = torch.cumsum(counts, 0)
        j = min(int(torch.searchsorted(cum, torch.tensor(float(k - below), dtype=torch.float64))), BINS - 1)
        width = (hi - lo) / BINS
        # One bin of margin each side: histc's bin edges and ours may differ by an ulp.
        new_lo, new_hi = max(0.0, lo + width * (j - 1)), lo + width * (j + 2)
        if counts[max(j - 1, 0) : j + 2].sum() <= EXACT_GATHER:
            found = _exact_in(weights, k, new_lo, new_hi)
            if found is not None:
                return found
        lo, hi = new_lo, new_hi
    raise RuntimeError("threshold search did not converge")


def _dtypes(weights: Sequence[torch.Tensor]) -> set[torch.dtype]:
    spec = getattr(weights, "spec", None)  # a streaming Source: from the headers, nothing read
    if spec is not None:
        return {spec(i).dtype for i in range(len(weights))}
    return {w.dtype for w in weights}


def _patterns(c: torch.Tensor) -> torch.Tensor:
    """``|c|``'s bit patterns (16-bit floats) or their top 15 bits (float32), as integers in
    [0, 2^15) that order like the magnitudes; in this thread's buffer."""
    st = parallel.state()
    bits = _BITS[c.dtype]
    raw = c.view(bits)
    buf = getattr(st, "pattern_buf", None)
    if buf is None or buf.dtype != bits or buf.numel() < c.numel():
        buf = st.pattern_buf = torch.empty(max(c.numel(), CHUNK), dtype=bits)
    out = buf[: c.numel()]
    if bits == torch.int16:
        return torch.bitwise_and(raw, 0x7FFF, out=out)
    torch.bitwise_right_shift(raw, 16, out=out)  # arithmetic: the sign lands in the low 15 bits' mask
    return out.bitwise_and_(0x7FFF)


def _pattern_counts(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """How many weights have each magnitude pattern (``_patterns``), over all tensors."""
    total = torch.zeros(PATTERNS, dtype=torch.int64)
    for w in weights:
        flat = w.detach().reshape(-1)
        parts = [flat[s : s + CHUNK] for s in range(0, flat.numel(), CHUNK)]
        for counts in parallel.map_ordered(lambda c: torch.bincount(_patterns(c), minlength=PATTERNS), parts):
            total += counts
    return total


def _pattern_value(p: int, dtype: torch.dtype) -> float:
    return float(torch.tensor([p], dtype=_BITS[dtype]).view(dtype)[0])


def _kth_by_patterns(weights: Sequence[torch.Tensor], k: int, dtype: torch.dtype) -> float | None:
    """The exact k-th smallest |w| from the pattern histogram (one pass for 16-bit floats, two
    for float32); None when a float32 bucket is too crowded to gather."""
    cum = torch.cumsum(_pattern_counts(weights), 0)
    p = int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.int64)))  # first with cum >= k
    if _BITS[dtype] == torch.int16:
        return _pattern_value(p, dtype)
    before = int(cum[p - 1]) if p else 0
    if int(cum[p]) - before > BUCKET_GATHER:
        return None

    def gather(c: torch.Tensor) -> torch.Tensor:
        return c.abs()[_patterns(c) == p]

    vals = []
    for w in weights:
        flat = w.detach().reshape(-1)
        vals += parallel.map_ordered(gather, [flat[s : s + CHUNK] for s in range(0, flat.numel(), CHUNK)])
    return float(torch.kthvalue(torch.cat(vals), k - before).values)


def kth_smallest_abs(weights: Sequence[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| (1-based) over all tensors, exactly, in bounded memory."""
    total = sum(w.numel() for w in weights)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    dtypes = _dtypes(weights)
    if len(dtypes) == 1 and next(iter(dtypes)) in _BITS:
        found = _kth_by_patterns(weights, k, next(iter(dtypes)))
        if found is not None:
            return found
    sample = _sample(weights, total)
    n = sample.numel()
    p = k / total
    margin = 6 * math.sqrt(max(p * (1 - p), 1.0 / n) / n) + 2.0 / n
    lo_i = max(0, math.floor((p - margin) * n))
    hi_i = min(n - 1, math.ceil((p + margin) * n))
    lo = float(sample[lo_i]) if lo_i > 0 else 0.0
    hi = float(sample[hi_i]) if hi_i < n - 1 else math.inf
    found = _exact_in(weights, k, lo, hi)
    return found if found is not None else _narrow(weights, k, lo, hi)


def prune_copy(x: torch.Tensor, threshold: float, inclusive: bool) -> tuple[torch.Tensor, int]:
    """``prune_below`` into a new tensor: ``x`` with ``|x| < threshold`` (``<=`` with
    ``inclusive``) zeroed, and how many the mask zeroed. ``x`` is not written (it may be a view of
    a read-only file map). Chunks run one per core; for 16-bit weights and a threshold they can
    hold exactly (a global threshold is one of the weights) the test is on bit patterns, which is
    the same set as the float comparison at a third of the work.

    Why integers: the mask is computed as integers of the weights' width (1 = prune), then turned
    into 0 / all-ones and ANDed with the weights' bits. ``torch.where(mask, 0, x)`` did the same
    in a loop torch does not vectorize: 4.5 ns a weight on one core here against 0.4, which was a
    quarter of a global pruning job's CPU time on a larger-than-memory checkpoint. The result is
    the same bits (a pruned weight is +0.0, a kept one untouched, NaN kept as before)."""
    y = torch.empty(x.shape, dtype=x.dtype)
    src, dst = x.reshape(-1), y.view(-1)
    p = None
    if _BITS.get(x.dtype) == torch.int16 and threshold >= 0:
        t = torch.tensor([threshold], dtype=x.dtype)
        if float(t[0]) == threshold:
            p = int(t.view(torch.int16)[0]) & 0x7FFF
    bits = _BITS.get(x.dtype)
    compare = torch.le if inclusive else torch.lt
    zero = torch.zeros((), dtype=x.dtype)

    def block(a: int) -> int:
        c, o = src[a : a + CHUNK], dst[a : a + CHUNK]
        st = parallel.state()
        if bits is None:  # float64 and other widths: no integer view of the same size
            m = getattr(st, "prune_mask", None)
            if m is None or m.numel() < c.numel():
                m = st.prune_mask = torch.empty(max(c.numel(), CHUNK), dtype=torch.bool)
            m = m[: c.numel()]
            buf = getattr(st, "prune_bufs", None)
            if buf is None:
                buf = st.prune_bufs = _Buffers()
            compare(buf.abs(c), threshold, out=m)
            torch.where(m, zero, c, out=o)
            return int(torch.count_nonzero(m))
        mask = getattr(st, "prune_ints", None)
        if mask is None or mask.dtype != bits or mask.numel() < c.numel():
            mask = st.prune_ints = torch.empty(max(c.numel(), CHUNK), dtype=bits)
        mask = mask[: c.numel()]
        if p is not None:
            compare(_patterns(c), p, out=mask)
        else:
            buf = getattr(st, "prune_bufs", None)
            if buf is None:
                buf = st.prune_bufs = _Buffers()
            compare(buf.abs(c), threshold, out=mask)
        pruned = int(torch.count_nonzero(mask))
        mask.sub_(1)  # 1 (prune) -> 0, 0 (keep) -> -1, every bit set
        torch.bitwise_and(c.view(bits), mask, out=o.view(bits))
        return pruned

    return y, sum(parallel.map_ordered(block, range(0, src.numel(), CHUNK)))


def prune_below(weights: Sequence[torch.Tensor], threshold: float, inclusive: bool) -> list[int]:
    """Zero |w| < threshold (or <= with ``inclusive``) in place; return each tensor's zero count.

    Every zero satisfies the mask (threshold > 0), so the mask's count is the zero count."""
    out = []
    buf = _Buffers()
    for w in weights:
        if not w.is_contiguous():
            mask = w.abs() <= threshold if inclusive else w.abs() < threshold
            w.data.masked_fill_(mask, 0)
            out.append(int((w == 0).sum()))
            continue
        zeros = 0
        flat = w.data.view(-1)
        for s in range(0, flat.numel(), CHUNK):
            c = flat[s : s + CHUNK]
            a = buf.abs(c)
            m = buf.m1[: c.numel()]
            (torch.le if inclusive else torch.lt)(a, threshold, out=m)
            c.masked_fill_(m, 0)
            zeros += int(torch.count_nonzero(m))
        out.append(zeros)
    return out


def prune_global(weights: Sequence[torch.Tensor], sparsity: float) -> list[int]:
    """One threshold over all tensors: the round(sparsity * total) smallest magnitudes go."""
    total = sum(w.numel() for w in weights)
    k = round(sparsity * total)
    if k == 0:
        return [int((w == 0).sum()) for w in weights]
    return prune_below(weights, kth_smallest_abs(weights, k), inclusive=True)


def prune_per_tensor(weights: Sequence[torch.Tensor], sparsity: float) -> list[int]:
    out = []
    for w in weights:
        k = round(sparsity * w.numel())
        if k:
            out += prune_below([w], kth_smallest_abs([w], k), inclusive=True)
        else:
            out.append(int((w == 0).sum()))
    return out


def prune_per_row(weights: Sequence[torch.Tensor], sparsity: float, row_dim: Sequence[int]) -> list[int]:
    """Prune the same fraction from every output row; ``row_dim`` says which dim indexes outputs
    (0 for nn.Linear's [out, in], 1 for GPT-2 Conv1D's [in, out])."""
    out = []
    for w, d in zip(weights, row_dim, strict=True):
        rows = w.data if d == 0 else w.data.t()
        k = round(sparsity * rows.shape[1])
        if k:
            idx = rows.abs().topk(k, dim=1, largest=False).indices
            rows.scatter_(1, idx, 0)
        out.append(int((w == 0).sum()))
    return out
