"""Knowledge-distillation loss (Hinton et al., 2015), with an optional hidden-state term::

    loss = α·CE + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T)) [+ β·H(student layers, teacher layers)]

``s``/``t`` are student/teacher logits. The KL is summed over the vocabulary (or classes) and
averaged over the real positions (``batchmean`` over the flattened positions whose mask is 1), so
padding neither adds to the loss nor dilutes it. T² keeps the soft term's gradients on the same
scale as the CE's as T grows. CE is the model's own task loss: next-token prediction for a causal
LM (targets are the input ids shifted left; padded targets are ignored), or the class labels for a
sequence classifier. ``H`` (:func:`hidden_state_loss`) compares aligned layers' outputs
(DistilBERT / TinyBERT style). Also here: the learning-rate schedule (:func:`lr_factor`) and the
held-out perplexity's sums (:func:`causal_lm_nll`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillLoss:
    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor  # KL alone, without T²
    hidden: torch.Tensor | None = None  # the hidden-state term alone, without β (None: not used)


def _valid(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten to (positions, vocab), keeping only positions whose mask is set."""
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return flat
    return flat[mask.reshape(-1).bool()]


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), ``batchmean`` over the real positions (0 when there are none)."""
    s = _valid(student_logits, mask).float()
    t = _valid(teacher_logits, mask).float()
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def causal_lm_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token CE: position i predicts token i+1; targets that are padding are ignored."""
    pred = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    target = input_ids[:, 1:].reshape(-1)
    if attention_mask is not None:
        keep = attention_mask[:, 1:].reshape(-1).bool()
        pred, target = pred[keep], target[keep]
    if target.numel() == 0:  # every sample one token long: nothing to predict
        return logits.sum() * 0.0
    return F.cross_entropy(pred, target)


def classifier_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def combine(ce: torch.Tensor, kl: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def causal_lm_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    alpha: float,
    temperature: float,
) -> DistillLoss:
    """Logits (batch, seq, vocab); KL over every real token position, CE over real next tokens."""
    ce = causal_lm_ce(student_logits, input_ids, attention_mask)
    kl = soft_kl(student_logits, teacher_logits, temperature, attention_mask)
    return DistillLoss(combine(ce, kl, alpha, temperature), ce, kl)


def classifier_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> DistillLoss:
    """Logits (batch, classes): one position per sample."""
    ce = classifier_ce(student_logits, labels)
    kl = soft_kl(student_logits, teacher_logits, temperature)
    return DistillLoss(combine(ce, kl, alpha, temperature), ce, kl)


# --------------------------------------------------------------------------- hidden states


def hidden_state_loss(
    student_states: list[torch.Tensor],
    teacher_states: list[torch.Tensor],
    kind: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the aligned layer pairs of a per-position distance between the student's and the
    teacher's hidden states (batch, seq, hidden), averaged over the real positions:

    * ``cosine``: ``1 − cos(s, t)`` (DistilBERT's cosine embedding loss, on every aligned layer
      rather than the last one only): scale-free, 0 when the directions agree, 2 when opposite;
    * ``mse``: ``mean over the hidden dimension of (s − t)²`` (TinyBERT): in the residual stream's
      own units, so its weight has to match their magnitude.

    The teacher's states are targets (no gradient flows into them)."""
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"{len(student_states)} student layers against {len(teacher_states)} teacher layers")
    keep = None if mask is None else mask.reshape(-1).bool()
    per_layer = []
    for s, t in zip(student_states, teacher_states, strict=True):
        s2 = s.reshape(-1, s.shape[-1]).float()
        t2 = t.detach().reshape(-1, t.shape[-1]).float()
        if keep is not None:
            s2, t2 = s2[keep], t2[keep]
        if s2.shape[0] == 0:
            per_layer.append(s.sum() * 0.0)
            continue
        if kind == "cosine":
            per_layer.append((1.0 - F.cosine_similarity(s2, t2, dim=-1, eps=1e-8)).mean())
        elif kind == "mse":
            per_layer.append(((s2 - t2) ** 2).mean())
        else:
            raise ValueError(f"unknown hidden-state loss {kind!r}")
    return torch.stack(per_layer).mean()


def with_hidden(loss: DistillLoss, hidden: torch.Tensor, weight: float) -> DistillLoss:
    """``loss.total + β·hidden``: the hidden-state term added to the logit loss."""
    return DistillLoss(loss.total + weight * hidden, loss.ce, loss.kl, hidden)


# --------------------------------------------------------------------------- the learning rate


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The multiple of the base learning rate at optimizer step ``step`` (1-based) of ``total``.

    Warm-up: ``step / warmup`` for the first ``warmup`` steps (linear, reaching the full rate at
    step ``warmup``; the first step already moves). Then ``constant``: 1; ``cosine``:
    ``½·(1 + cos(π·p))`` with ``p = (step − warmup − 1) / (total − warmup)``, so the first step
    after the warm-up runs at the full rate and the last one at a small positive rate (a last
    step at 0 would be a wasted step)."""
    if step < 1:
        raise ValueError("steps count from 1")
    if warmup > 0 and step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total - warmup, 1)
        p = min((step - warmup - 1) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


# --------------------------------------------------------------------------- held-out figures


def causal_lm_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens (targets that
    are padding are left out), for a token-weighted perplexity ``exp(Σ nll / Σ tokens)``."""
    pred = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    target = input_ids[:, 1:].reshape(-1)
    if attention_mask is not None:
        keep = attention_mask[:, 1:].reshape(-1).bool()
        pred, target = pred[keep], target[keep]
    if target.numel() == 0:
        return 0.0, 0
    return float(F.cross_entropy(pred, target, reduction="sum")), int(target.numel())
