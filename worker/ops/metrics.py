"""Report math on plain tensors: perplexity, fidelity (KL, top-1 agreement, cosine), accuracy,
pooled embeddings and latency statistics. Orchestration (which model, which inputs) lives in
worker/evaluate.py; this module only computes.

Conventions: logits are ``(positions, classes)``; KL is ``KL(P_original ‖ Q_compressed)`` summed
over classes, one value per position, so an unchanged model gives exactly 0 (the same float ops on
the same inputs give bit-identical logits on one machine).
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of the negative log-likelihoods of tokens 1..T-1 given their prefixes, and their count.
    ``logits``: (T, V) of one sequence; ``ids``: (T,)."""
    if ids.numel() < 2:
        return 0.0, 0
    logp = F.log_softmax(logits[:-1].double(), dim=-1)
    nll = -logp.gather(1, ids[1:].long().unsqueeze(1)).squeeze(1)
    return float(nll.sum()), int(nll.numel())


def perplexity(total_nll: float, count: int) -> float:
    """Token-weighted perplexity over a corpus: ``exp(Σ nll / Σ tokens)``."""
    if count == 0:
        raise ValueError("no tokens to score")
    return math.exp(total_nll / count)


def kl_per_position(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) ‖ softmax(q))`` for each position (row), in float64, clamped at 0 (tiny
    negative values are rounding)."""
    logp = F.log_softmax(p_logits.double(), dim=-1)
    logq = F.log_softmax(q_logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def top1_agreement(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both put their highest score on the same class, else 0.0, per position."""
    return (p_logits.argmax(-1) == q_logits.argmax(-1)).double()


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows in float64; rows that are all zero in both count as 1."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(-1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
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
