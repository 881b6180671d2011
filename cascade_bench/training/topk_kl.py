"""KL divergence to a teacher known by its top-k next-token probabilities.

The teacher's distribution is kept as its ``k`` most likely ids with their log-probabilities
(normalised over the whole vocabulary). Both distributions are folded onto ``k + 1`` outcomes: each
of those ids, and "any other id" (the remaining mass). The loss is KL(teacher || student) over
those outcomes: exactly zero when the student's probabilities of the teacher's top-k ids equal the
teacher's (so when student and teacher are the same model), and, unlike a cross-entropy renormalised
over the top-k, it also penalises mass the student puts outside them.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: log-probabilities above this are treated as log(1 - tiny) when taking log(1 - p) (keeps it finite).
_LOG_ONE = -1e-7


def log1mexp(log_p: Tensor) -> Tensor:
    """log(1 - exp(log_p)) for log_p <= 0, stably on both sides of log 2."""
    log_p = log_p.clamp(max=_LOG_ONE)
    return torch.where(log_p > -0.6931, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def topk_kl(student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor) -> Tensor:
    """Per position KL(teacher || student) over the teacher's top-k ids and the rest (module doc).

    student_logits (..., V); teacher_logprobs (..., k) (full-vocabulary log-probabilities);
    teacher_ids (..., k). Returns (...) float32."""
    if teacher_logprobs.shape != teacher_ids.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} need teacher log-probabilities and ids of shape "
            f"(..., k) with the same leading dims, got {tuple(teacher_logprobs.shape)} and {tuple(teacher_ids.shape)}"
        )
    log_q = student_logits.float().log_softmax(-1).gather(-1, teacher_ids.long())
    log_p = teacher_logprobs.float()
    p = log_p.exp()
    rest_p = log1mexp(torch.logsumexp(log_p, dim=-1))
    rest_q = log1mexp(torch.logsumexp(log_q, dim=-1))
    return (p * (log_p - log_q)).sum(-1) + rest_p.exp() * (rest_p - rest_q)


__all__ = ["log1mexp", "topk_kl"]
