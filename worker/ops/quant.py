"""Round-to-nearest (RTN) integer quantization and the study's fixed-point rounding.

The conventions are compressed-tensors' own (``calculate_qparams`` and ``quantize`` in
compressed_tensors 0.19), so the error metrics computed here describe exactly the integers that
library writes to disk when it is handed the scales computed here (tests/test_quant_ops.py checks
the integers are identical):

* ``b`` bits hold the integers ``[-2^(b-1), 2^(b-1) - 1]`` (int8 for 8 bits, -8..7 for 4 bits).
* symmetric: ``scale = max|w| / ((2^b - 1) / 2)``, zero point 0. The divisor is 127.5 (8 bits),
  not 127: the extra negative code is used, and ``+max|w|`` lands on 127.5, which clamps to 127,
  an error of exactly ``scale / 2`` at worst.
* asymmetric: the range is widened to hold 0 (``lo = min(min w, 0)``, ``hi = max(max w, 0)``),
  ``scale = (hi - lo) / (2^b - 1)``, ``zero_point = round(clamp(qmin - lo / scale))``.
* ``q = clamp(round(w / scale + zero_point), qmin, qmax)`` (``torch.round``: half to even),
  ``w' = (q - zero_point) * scale``. Rounding is the only error inside the range, so
  ``|w - w'| <= scale / 2`` for every weight (up to float rounding of ``w / scale``).
* a scale of 0 (an all-zero row or group) becomes the dtype's eps, so the division is defined
  and zeros stay zeros.

Shapes: weights are ``(out_features, in_features)`` (``nn.Linear``). Per output channel the scale
is ``(out, 1)``; with groups of ``g`` consecutive input columns it is ``(out, in / g)``; a single
per-tensor scale is ``(1,)``.

Fixed point (the study's ``round(w * 2^n) / 2^n``): integers of ``bits`` bits with a power-of-two
scale ``2^-n`` and zero point 0. Multiplying or dividing by a power of two is exact in binary
floating point, so ``fixed_point`` equals the study's formula bit for bit wherever the rounded
integer fits; outside ``[qmin, qmax]`` it is clipped, and the number of clipped weights is
returned so the method can report it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


def int_range(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits`` bits, e.g. (-128, 127) for 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (int8 container), got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(out, in)`` -> ``(out, n_groups, g)``; per channel is one group of the whole row."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if group_size is None:
        return w.unsqueeze(1)
    if w.shape[1] % group_size:
        raise ValueError(f"in_features {w.shape[1]} is not a multiple of group_size {group_size}")
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


@torch.no_grad()
def rtn_qparams(
    w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of round-to-nearest quantization, per output channel
    (``group_size=None``, shape ``(out, 1)``) or per group of input columns (``(out, in/g)``).

    The scale is float32 whatever ``w``'s dtype; the caller stores it in the weight's dtype and
    quantizes with the stored value (as compressed-tensors does). The zero point is int8, the
    dtype compressed-tensors keeps it in."""
    qmin, qmax = int_range(bits)
    # The extremes of the weights in their own dtype, widened after: min and max are exact in any
    # float dtype, and a float32 copy of the weights would cost more than the reduction.
    # amin and amax apart: torch's aminmax over a short last dimension runs several times slower
    # than the two reductions together (measured on groups of 128).
    g = _groups(w.detach(), group_size)
    lo = torch.clamp(g.amin(-1).float(), max=0.0)
    hi = torch.clamp(g.amax(-1).float(), min=0.0)
    if symmetric:
        return symmetric_qparams(torch.maximum(lo.abs(), hi), bits)
    scale = _nonzero_scale((hi - lo) / (qmax - qmin))
    zp = torch.clamp(qmin - lo / scale, qmin, qmax)
    return scale, torch.round(zp).to(torch.int8)


def symmetric_qparams(max_abs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rtn_qparams``' symmetric scale and zero point from each row's or group's largest
    magnitude (float32, the scale's shape), however that was found (``group_max_abs``)."""
    qmin, qmax = int_range(bits)
    scale = _nonzero_scale(max_abs / ((qmax - qmin) / 2))
    return scale, torch.zeros(scale.shape, dtype=torch.int8)


def _nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.tensor(_eps(torch.float32)), scale)


def _broadcast(
    w: torch.Tensor, scale: torch.Tensor, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if group_size is None:
        return w, None  # (out, 1) or (1,) scales broadcast over the row as they are
    return _groups(w, group_size), scale.unsqueeze(-1)


@torch.no_grad()
def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group_size: int | None = None
) -> torch.Tensor:
    """Integers (int8) of ``w`` for the given scale/zero point; same shape as ``w``."""
    qmin, qmax = int_range(bits)
    x, s = _broadcast(w, scale, group_size)
    s = scale if s is None else s
    zp = None if zero_point is None else (zero_point if group_size is None else zero_point.unsqueeze(-1))
    # One temporary, updated in place: the weights are the big tensors here.
    v = x / s.to(x.dtype)
    if zp is not None:
        v.add_(zp.to(x.dtype))
    q = v.clamp_(qmin, qmax).round_().to(torch.int8)
    return q.reshape(w.shape)


@torch.no_grad()
def quantize_rows(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    scratch: Scratch,
    w_float: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float, float]:
    """``quantize`` and the error of what loads back, in one pass over reused buffers: the
    integers (int8, a view of ``scratch``, valid until its next use), ``sum((w' - w)^2)``,
    ``sum(w^2)`` and ``max|w' - w|``.

    ``scale`` (and ``zero_point``) are the stored ones, ``scale`` in ``w``'s dtype: the integers
    are computed in that dtype exactly as compressed-tensors' ``quantize`` does (``w / s + zp``,
    clamp, round half to even), and ``w'`` exactly as its ``dequantize`` does (``(q - zp) * s`` in
    the scale's dtype), so the error is the one the artifact has. The sums are float32.
    ``w_float``: ``w`` as float32 when the caller has it already (not in a ``scratch`` slot 0-2).

    Why buffers: callers hand row blocks of a few hundred thousand weights, so every temporary
    stays in cache and nothing is allocated (fresh multi-MB tensors cost page faults that take
    longer than the arithmetic); the streaming engine runs one block per core at once, each
    thread with its own ``scratch``."""
    qmin, qmax = int_range(bits)
    x, s = _broadcast(w, scale, group_size)
    s = (scale if s is None else s).to(x.dtype)
    v = torch.div(x, s, out=scratch.get(0, x))
    zp = None
    if zero_point is not None:
        zp = (zero_point if group_size is None else zero_point.unsqueeze(-1)).to(x.dtype)
        v.add_(zp)
    v.clamp_(qmin, qmax).round_()
    q = scratch.get(1, x, torch.int8)
    q.copy_(v)
    # What loads back, in the scale's dtype, then the difference in float32.
    if zp is not None:
        v.sub_(zp)
    v.mul_(s)
    if w_float is not None:
        wf = w_float.reshape(x.shape)
    elif x.dtype == torch.float32:
        wf = x
    else:
        wf = scratch.get(3, x, torch.float32)
        wf.copy_(x)
    # One op widens w' exactly and subtracts (type promotion), where a copy then a sub took two.
    d = torch.sub(v, wf, out=scratch.get(2, x, torch.float32))
    dv, wv = d.reshape(-1), wf.reshape(-1)
    sq_err, sq_w = float(torch.dot(dv, dv)), float(torch.dot(wv, wv))
    if dv.numel():
        lo, hi = torch.aminmax(dv)  # over the whole block: fast (unlike per group)
        max_err = max(-float(lo), float(hi))
    else:
        max_err = 0.0
    return q.reshape(w.shape), sq_err, sq_w, max_err


_SIGNLESS = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def magnitude_bits(w: torch.Tensor, scratch: Scratch) -> torch.Tensor | None:
    """``|w|`` as the integers of its bit patterns (sign cleared; scratch slot 4), for a
    contiguous bf16, fp16 or fp32 tensor; None for others. For floats that are not NaN the order of
    these integers is the order of the magnitudes and 0 is 0.0, so a count of non-zeros and the
    largest magnitude per group run as integer ops on half the bytes of a float32 copy (~2x faster
    than torch's float comparisons and reductions, measured on 4-bit row blocks)."""
    bits = _SIGNLESS.get(w.dtype)
    if bits is None or not w.is_contiguous():
        return None
    raw = w.view(bits[0])
    return torch.bitwise_and(raw, bits[1], out=scratch.get(4, raw))


def count_nonzero(w: torch.Tensor, scratch: Scratch, magnitude: torch.Tensor | None = None) -> int:
    """``torch.count_nonzero(w)`` for a float tensor, counted on ``magnitude_bits`` (so ``-0.0``
    is a zero and NaN is not); ``magnitude``: those bits when the caller has them already."""
    mag = magnitude if magnitude is not None else magnitude_bits(w, scratch)
    if mag is None:
        return int(torch.count_nonzero(w))
    # min(m, 1) summed: torch's count_nonzero on integers runs ~2x slower than these two ops.
    ones = torch.clamp(mag, max=1, out=scratch.get(5, mag))
    return int(ones.sum(dtype=torch.int32 if mag.numel() < 2**31 else torch.int64))


def group_max_abs(magnitude: torch.Tensor, dtype: torch.dtype, group_size: int | None) -> torch.Tensor:
    """The largest ``|w|`` of each row (``group_size`` None, ``(out, 1)``) or group
    (``(out, in/g)``) as float32, from ``magnitude_bits`` of ``w`` (whose float ``dtype`` is
    given): the integer maximum is the float one's bit pattern, so the result equals
    ``w``'s own ``abs().amax`` exactly."""
    g = _groups(magnitude, group_size)
    return g.amax(-1).view(dtype).float()


@torch.no_grad()
def quantize_error(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """The error ``dequantize(quantize(w)) - w`` as float32, the dequantization done in the
    scale's dtype as compressed-tensors loads it (the same error ``quantize_rows`` sums). With
    ``scratch`` the result lives in reused buffers (valid until the next call): fresh multi-MB
    temporaries per layer cost page faults that take longer than the arithmetic."""
    qmin, qmax = int_range(bits)
    x, s = _broadcast(w, scale, group_size)
    s = (scale if s is None else s).to(x.dtype)
    scratch = scratch or Scratch()
    v = torch.div(x, s, out=scratch.get(0, x))
    if zero_point is not None:
        zp = (zero_point if group_size is None else zero_point.unsqueeze(-1)).to(x.dtype)
        v.add_(zp).clamp_(qmin, qmax).round_().sub_(zp)
    else:
        v.clamp_(qmin, qmax).round_()
    d = scratch.get(2, x, torch.float32)
    d.copy_(v.mul_(s))
    return d.sub_(x).reshape(w.shape)


def pack_int32(
    q: torch.Tensor, bits: int, out: torch.Tensor | None = None, scratch: Scratch | None = None
) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` of a 2-D int8 tensor along its rows, bit for bit.

    For 8 bits, and 4 bits with a multiple of 8 columns, the int32 words are built from bytes:
    the library stores ``q + 2^(b-1)`` with element ``i`` at bit ``b*i`` of its word, which on
    a little-endian machine is byte ``i`` (8 bits) or the low then the high nibble of a byte (4
    bits). That is a few contiguous integer operations instead of its scatter over int32 (0.3-0.5
    against 6.5 ns a weight for 4 bits on one core here, which matters when a checkpoint streams
    through). Other layouts use the library's function. ``out``: where to write the words (rows x
    cols*bits/32 int32); ``q`` is clobbered; ``scratch``: where the 4-bit path keeps its temporary
    (slot 6)."""
    rows, cols = q.shape
    if (
        sys.byteorder == "little"
        and q.is_contiguous()
        and ((bits == 8 and cols % 4 == 0) or (bits == 4 and cols % 8 == 0))
    ):
        u = q.view(torch.uint8)
        if out is None:
            out = torch.empty(rows, cols * bits // 32, dtype=torch.int32)
        o = out.view(torch.uint8)
        if bits == 8:
            torch.bitwise_xor(u, 0x80, out=o)  # q + 128 (mod 256)
            return out
        # Each pair of elements as one int16: element 2i in the low byte, 2i+1 in the high one.
        # q + 8 (mod 16) is q's low nibble with its top bit flipped; shifting the word right by 4
        # puts the high byte's nibble above the low one's, and the word's low byte is the pair
        # packed. Strided byte ops on every other element (the obvious way) run ~5x slower.
        if q.storage_offset() % 2 or q.stride(0) % 2:  # no int16 view of an odd start (a 1-row slice)
            q = torch.empty(q.shape, dtype=q.dtype).copy_(q)  # (clone would keep the odd stride)
        pairs = q.view(torch.int16)
        pairs.bitwise_xor_(0x0808).bitwise_and_(0x0F0F)
        high = (scratch or Scratch()).get(6, pairs)
        pairs.bitwise_or_(torch.bitwise_right_shift(pairs, 4, out=high)).bitwise_and_(0xFF)
        o.view(rows, cols // 2).copy_(pairs)  # in 0..255: the same in uint8
        return out
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    packed = pack_to_int32(q, bits)
    if out is not None:
        out.copy_(packed)
        return out
    return packed


class Scratch:
    """Reusable flat buffers, grown to the largest tensor seen."""

    def __init__(self) -> None:
        self._bufs: dict[int, torch.Tensor] = {}

    def get(self, slot: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A buffer of ``like``'s shape and ``dtype`` (default ``like``'s)."""
        dtype = dtype or like.dtype
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < like.numel() or buf.dtype != dtype:
            buf = self._bufs[slot] = torch.empty(like.numel(), dtype=dtype)
        return buf[: like.numel()].view(like.shape)


@torch.no_grad()
def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int | None = None
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the scale's dtype; same shape as ``q``."""
    x, s = _broadcast(q, scale, group_size)
    s = scale if s is None else s
    v = x.to(scale.dtype)
    if zero_point is not None:
        v.sub_((zero_point if group_size is None else zero_point.unsqueeze(-1)).to(scale.dtype))
    return v.mul_(s).reshape(q.shape)


def fixed_point_scale(frac_bits: int) -> float:
    """``2^-n``: exact in every float dtype for the n the method accepts (0..16)."""
    return 2.0**-frac_bits


@torch.no_grad()
def fixed_point_round(w: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """The study's formula, unclipped: ``round(w * 2^n) / 2^n``."""
    return torch.round(w * 2.0**frac_bits) / 2.0**frac_bits


@torch.no_grad()
def fixed_point(w: torch.Tensor, frac_bits: int, bits: int) -> tuple[torch.Tensor, int]:
    """Fixed-point integers (int8) of ``w``: ``clamp(round(w * 2^n), qmin, qmax)``, and how many
    weights were clipped (their rounded value did not fit in ``bits`` bits)."""
    qmin, qmax = int_range(bits)
    r = torch.round(w * 2.0**frac_bits)
    clipped = int(((r < qmin) | (r > qmax)).sum())
    return torch.clamp(r, qmin, qmax).to(torch.int8), clipped


@dataclass
class ErrorStats:
    """Running totals of the quantization error over many weight tensors."""

    elements: int = 0
    sq_err: float = 0.0
    sq_w: float = 0.0
    max_abs_err: float = 0.0

    def add(self, w: torch.Tensor, deq: torch.Tensor) -> float:
        """Accumulate one tensor; returns its relative RMS error ``||w - w'|| / ||w||``.

        Norms in float32 (vector_norm reduces accurately without a float64 copy of the weights,
        which cost more than the quantization itself)."""
        w = w.detach().float()
        return self.add_diff(w, (deq.float() - w))

    def add_diff(self, w: torch.Tensor, d: torch.Tensor) -> float:
        """Like ``add`` with the difference ``w' - w`` already computed (in place by the caller)."""
        d = d.reshape(-1)
        se = float(torch.linalg.vector_norm(d, dtype=torch.float32)) ** 2
        sw = float(torch.linalg.vector_norm(w, dtype=torch.float32)) ** 2
        self.elements += w.numel()
        self.sq_err += se
        self.sq_w += sw
        self.max_abs_err = max(
            self.max_abs_err,
            float(torch.linalg.vector_norm(d, ord=float("inf"), dtype=torch.float32)) if d.numel() else 0.0,
        )
        return (se / sw) ** 0.5 if sw else 0.0

    @property
    def relative_rms_error(self) -> float:
        return (self.sq_err / self.sq_w) ** 0.5 if self.sq_w else 0.0
