"""Report math on plain tensors: perplexity, fidelity (KL, top-1 agreement, cosine), accuracy,
pooled embeddings, latency statistics, confidence intervals and the evaluation budget's counts.
Orchestration (which model, which inputs, when to stop) lives in worker/evaluate.py; this module
only computes.

Conventions: logits are ``(positions, classes)``; KL is ``KL(P_original ‖ Q_compressed)`` summed
over classes, one value per position, so an unchanged model gives exactly 0 (the same float ops on
the same inputs give bit-identical logits on one machine).

Precision and cost: a 262k-token vocabulary makes every position a 262,144-wide row, and the
per-position math ran in float64 until it cost more than the forward pass itself. Elementwise work
(subtract, exp, multiply) now runs in the logits' own precision (float32; float64 inputs stay
float64) and every reduction over the vocabulary (sums, log-sum-exp) accumulates in float64:
~3-4x less time on the same rows, with KL and NLL within ~1e-7 (relative) of an all-float64 pass.
"""

from __future__ import annotations

import math
import statistics

import torch


def _work(x: torch.Tensor) -> torch.Tensor:
    """The precision elementwise math runs in: float32, or float64 when given float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_sum_exp(x: torch.Tensor) -> torch.Tensor:
    """``log Σ exp(x)`` over the last dimension, as float64: exp in ``x``'s precision after
    subtracting the row maximum, the sum accumulated in float64."""
    x = _work(x)
    mx = x.amax(-1, keepdim=True)
    return mx.squeeze(-1).double() + torch.exp(x - mx).sum(-1, dtype=torch.float64).log()


def next_token_nll_per_position(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood (float64) of each token 1..T-1 given its prefix.
    ``logits``: (T, V) of one sequence; ``ids``: (T,)."""
    if ids.numel() < 2:
        return torch.zeros(0, dtype=torch.float64)
    rows = _work(logits[:-1])
    picked = rows.gather(1, ids[1:].long().unsqueeze(1).to(rows.device)).squeeze(1).double()
    return log_sum_exp(rows) - picked


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of the negative log-likelihoods of tokens 1..T-1 given their prefixes, and their count.
    ``logits``: (T, V) of one sequence; ``ids``: (T,)."""
    nll = next_token_nll_per_position(logits, ids)
    return float(nll.sum()), int(nll.numel())


def perplexity(total_nll: float, count: int) -> float:
    """Token-weighted perplexity over a corpus: ``exp(Σ nll / Σ tokens)``."""
    if count == 0:
        raise ValueError("no tokens to score")
    return math.exp(total_nll / count)


def kl_per_position(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) ‖ softmax(q))`` for each position (row), as float64, clamped at 0 (tiny
    negative values are rounding). Computed as ``Σ P·(p - q) - (lse(p) - lse(q))``: the
    difference of the logits is exact where they agree, so identical rows give exactly 0."""
    p, q = _work(p_logits), _work(q_logits)
    if p.dtype != q.dtype:
        p, q = p.double(), q.double()
    mx = p.amax(-1, keepdim=True)
    e = torch.exp(p - mx)
    z = e.sum(-1, dtype=torch.float64)
    lse_p = mx.squeeze(-1).double() + z.log()
    weighted = (e * (p - q)).sum(-1, dtype=torch.float64) / z
    return (weighted - (lse_p - log_sum_exp(q))).clamp_min(0.0)


def top1_agreement(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both put their highest score on the same class, else 0.0, per position."""
    return (p_logits.argmax(-1) == q_logits.argmax(-1)).double()


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows (products in the inputs' precision, sums in float64);
    rows that are all zero in both count as 1."""
    a, b = _work(a), _work(b)
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    dot = (a * b).sum(-1, dtype=torch.float64)
    na = (a * a).sum(-1, dtype=torch.float64).sqrt()
    nb = (b * b).sum(-1, dtype=torch.float64).sqrt()
    both_zero = (na == 0) & (nb == 0)
    cos = dot / (na * nb).clamp_min(1e-300)
    return torch.where(both_zero, torch.ones_like(cos), cos.clamp(-1.0, 1.0))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embedding: the mean of the token vectors whose mask is 1. ``hidden``: (T, H)."""
    if mask is None:
        return hidden.double().mean(0)
    m = mask.double().unsqueeze(-1)
    return (hidden.double() * m).sum(0) / m.sum().clamp_min(1.0)


def latency_stats(seconds: list[float]) -> dict[str, float | list[float]]:
    """Median, min and max in milliseconds, plus every timed run."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "median_ms": round(statistics.median(ms), 4),
        "min_ms": round(min(ms), 4),
        "max_ms": round(max(ms), 4),
        "samples_ms": [round(x, 4) for x in ms],
    }


# -- confidence intervals --------------------------------------------------------------------------
def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _beta_inc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom (bisection
    on its CDF; 12.706 for p 0.975, df 1; 1.960 as df grows)."""
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


RATIO_CI_METHOD = (
    "t-interval over samples (Student t, n-1 df) on the ratio estimator Σ value / Σ positions, "
    "with its linearized (delta-method) standard error"
)


def ratio_t_interval(
    sums: list[float], counts: list[float], confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """``r = Σ sums / Σ counts`` (a token-weighted mean over samples: positions inside one text are
    not independent, samples are the unit) and its two-sided interval
    ``r ± t(n-1) · sqrt(n / (n-1) · Σ (s_i - r·c_i)²) / Σ c_i``. None when fewer than 2 samples
    have positions (no spread to measure)."""
    pairs = [(float(s), float(c)) for s, c in zip(sums, counts, strict=True) if c > 0]
    n = len(pairs)
    total = sum(c for _, c in pairs)
    if n < 2 or total <= 0:
        return None
    r = sum(s for s, _ in pairs) / total
    resid = sum((s - r * c) ** 2 for s, c in pairs)
    se = math.sqrt(n / (n - 1) * resid) / total
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
    return r, r - half, r + half


def perplexity_interval(nll_sums: list[float], counts: list[float]) -> list[float] | None:
    """95 % interval of a token-weighted perplexity: the ratio t-interval on the mean NLL per
    token, through exp (so it brackets ``exp(Σ nll / Σ tokens)`` and is asymmetric around it)."""
    ci = ratio_t_interval(nll_sums, counts)
    return None if ci is None else [math.exp(ci[1]), math.exp(ci[2])]


def mean_interval(
    sums: list[float], counts: list[float], lo: float | None = None, hi: float | None = None
) -> list[float] | None:
    """95 % interval of a position-weighted mean (``ratio_t_interval``), clipped to the value's
    range (KL >= 0, an agreement rate in [0, 1])."""
    ci = ratio_t_interval(sums, counts)
    if ci is None:
        return None
    a, b = ci[1], ci[2]
    if lo is not None:
        a, b = max(a, lo), max(b, lo)
    if hi is not None:
        a, b = min(a, hi), min(b, hi)
    return [a, b]


# -- the evaluation budget ---------------------------------------------------------------------------
def runs_that_fit(seconds: float, cost_s: float, cap: int, minimum: int) -> int:
    """How many passes of ``cost_s`` fit in ``seconds``: at most ``cap``, at least
    ``min(minimum, cap)`` (a figure needs that many, budget or not)."""
    floor = min(minimum, cap)
    if cost_s <= 0:
        return cap
    return max(floor, min(cap, int(seconds // cost_s)))
