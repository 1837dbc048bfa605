"""Knowledge-distillation loss (Hinton et al., 2015)::

    loss = α·CE + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))

``s``/``t`` are student/teacher logits. The KL is summed over the vocabulary (or classes) and
averaged over the real positions (``batchmean`` over the flattened positions whose mask is 1), so
padding neither adds to the loss nor dilutes it. T² keeps the soft term's gradients on the same
scale as the CE's as T grows. CE is the model's own task loss: next-token prediction for a causal
LM (targets are the input ids shifted left; padded targets are ignored), or the class labels for a
sequence classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillLoss:
    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor  # KL alone, without T²


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
