"""Pruning math on tiny tensors, against plain sorting."""

from __future__ import annotations

import pytest
import torch

from worker.ops import sparsity as ops

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("k", [1, 7, 500, 1999, 2000])
def test_kth_smallest_abs_matches_sort(k):
    torch.manual_seed(k)
    ws = [torch.randn(30, 20), torch.randn(1000) * 5, torch.randn(10, 40) * 0.01]
    expect = torch.cat([w.abs().reshape(-1) for w in ws]).sort().values[k - 1]
    assert ops.kth_smallest_abs(ws, k) == pytest.approx(float(expect), rel=0, abs=0)


def test_kth_smallest_abs_narrows_over_many_chunks(monkeypatch):
    # Small chunk, sample and gather sizes force the sample miss and the histogram narrowing path
    # (no float32 pattern bucket may be gathered, so the general search runs).
    monkeypatch.setattr(ops, "BUCKET_GATHER", 0)
    monkeypatch.setattr(ops, "CHUNK", 1000)
    monkeypatch.setattr(ops, "SAMPLE", 100)
    monkeypatch.setattr(ops, "EXACT_GATHER", 50)
    torch.manual_seed(0)
    ws = [torch.randn(100_000), torch.randn(300, 300)]
    allv = torch.cat([w.abs().reshape(-1) for w in ws]).sort().values
    for k in (1, 12345, 95_000, allv.numel()):
        assert ops.kth_smallest_abs(ws, k) == float(allv[k - 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kth_by_bit_patterns_is_exact(monkeypatch, dtype):
    """The pattern histogram (one pass for 16-bit floats, two for float32) over several chunks
    and tensors gives exactly the sorted k-th magnitude, with signed zeros, ties and extremes."""
    monkeypatch.setattr(ops, "CHUNK", 4096)  # several chunks per tensor, counted on the pool
    g = torch.Generator().manual_seed(3)
    ws = [
        (torch.randn(300, 70, generator=g) * 0.02).to(dtype),
        (torch.randn(5000, generator=g) * 3).to(dtype),
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 0.5, 65504.0, -65504.0]).to(dtype),
    ]
    allv = torch.cat([w.float().abs().reshape(-1) for w in ws]).sort().values
    for k in (1, 2, 3, 777, 10_000, 21_000, allv.numel() - 1, allv.numel()):
        assert ops.kth_smallest_abs(ws, k) == float(allv[k - 1]), k


def test_kth_mixed_dtypes_uses_the_general_search():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(400, generator=g).to(torch.bfloat16), torch.randn(300, generator=g)]
    allv = torch.cat([w.float().abs() for w in ws]).sort().values
    for k in (1, 350, 700):
        assert ops.kth_smallest_abs(ws, k) == float(allv[k - 1])


def test_kth_with_many_ties():
    ws = [torch.tensor([0.0] * 500 + [1.0] * 500), torch.full((10, 10), 2.0)]
    assert ops.kth_smallest_abs(ws, 500) == 0.0
    assert ops.kth_smallest_abs(ws, 501) == 1.0
    assert ops.kth_smallest_abs(ws, 1100) == 2.0


def test_global_prune_hits_requested_sparsity_exactly():
    torch.manual_seed(1)
    ws = [torch.randn(64, 32), torch.randn(16, 16) * 3]
    originals = [w.clone() for w in ws]
    zeros = sum(ops.prune_global(ws, 0.5))
    total = sum(w.numel() for w in ws)
    assert zeros == total // 2 == sum(int((w == 0).sum()) for w in ws)
    # The pruned ones are the smallest: every survivor is larger than every pruned original.
    pruned = torch.cat([o[w == 0].abs() for o, w in zip(originals, ws, strict=True)])
    kept = torch.cat([o[w != 0].abs() for o, w in zip(originals, ws, strict=True)])
    assert pruned.max() < kept.min()


def test_threshold_prunes_strictly_below():
    w = torch.tensor([[-0.5, 0.125, 0.25], [0.375, -0.0625, 1.0]])
    assert ops.prune_below([w], 0.25, inclusive=False) == [2]
    assert w.tolist() == [[-0.5, 0.0, 0.25], [0.375, 0.0, 1.0]]


def test_per_tensor_and_per_row():
    torch.manual_seed(2)
    a, b = torch.randn(8, 10), torch.randn(4, 10)
    assert ops.prune_per_tensor([a, b], 0.3) == [24, 12]
    assert int((a == 0).sum()) == 24 and int((b == 0).sum()) == 12
    lin = torch.randn(6, 10)  # nn.Linear layout [out, in]
    conv = torch.randn(10, 6)  # GPT-2 Conv1D layout [in, out]
    assert ops.prune_per_row([lin, conv], 0.5, [0, 1]) == [30, 30]
    assert ((lin == 0).sum(dim=1) == 5).all()
    assert ((conv == 0).sum(dim=0) == 5).all()


class _Counted(list):
    """The tensors, counting how often they are read through (each pass iterates them once)."""

    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


def test_kth_smallest_abs_reads_few_times_when_the_interval_is_crowded(monkeypatch):
    """Billions of weights put hundreds of millions of values in the sample's interval: too many to
    gather. The search then narrows inside that interval (not from zero to the maximum) with one
    fine histogram, so it reads the weights a handful of times, not once per narrowing round."""
    monkeypatch.setattr(ops, "CHUNK", 4096)
    monkeypatch.setattr(ops, "SAMPLE", 1000)
    monkeypatch.setattr(ops, "EXACT_GATHER", 20)
    torch.manual_seed(3)
    ws = _Counted([torch.randn(1_500_000), torch.randn(1000, 500)])
    allv = torch.cat([w.abs().reshape(-1) for w in ws]).sort().values
    _Counted.passes = 0
    k = allv.numel() // 2
    assert ops.kth_smallest_abs(ws, k) == float(allv[k - 1])
    # The size sum, the sample, the crowded exact try (it stops early), histogram passes inside
    # the sample's interval, the exact gather: 6 here (7 narrowing from the whole range, before).
    assert _Counted.passes <= 6, _Counted.passes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.3, 1e-3])
@pytest.mark.parametrize("inclusive", [True, False])
def test_prune_copy_equals_prune_below(monkeypatch, dtype, threshold, inclusive):
    """The copying form (bit patterns where the threshold is a value of the dtype, float compare
    where it is not, e.g. 0.3 in bf16; an integer mask ANDed with the weights' bits, or
    ``torch.where`` for float64) zeroes exactly what the in-place form does, bit for bit (a
    pruned -0.25 is +0.0, NaN and infinities are kept), and leaves its input alone."""
    monkeypatch.setattr(ops, "CHUNK", 1000)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(70, 50, generator=g) * 0.4).to(dtype)
    x[0, :7] = torch.tensor([0.0, -0.0, 0.25, -0.25, float("nan"), float("inf"), -float("inf")]).to(dtype)
    before = x.clone()
    y, zeros = ops.prune_copy(x, threshold, inclusive)
    expected = x.clone()
    assert zeros == ops.prune_below([expected], threshold, inclusive)[0]
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(y.view(as_int), expected.view(as_int))
    assert torch.equal(x.view(as_int), before.view(as_int))
