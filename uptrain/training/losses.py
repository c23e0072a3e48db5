"""Training losses: next-token cross-entropy, optionally mixed with distillation from a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between softmax(logits / T) distributions.

    logits: (B, T, V) for the positions that predict a next token.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)  # (B·T, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def training_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    teacher: torch.nn.Module | None = None,
    weight: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy) for packed blocks of input_ids (B, T).

    Blocks are full and unpadded, so no attention mask is passed: the sdpa kernel then runs
    grouped-query attention natively instead of repeating K/V heads.
    With a teacher: loss = (1 - w)·CE + w·T²·KL(teacher || student).
    """
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    if teacher is None or weight == 0.0:
        return out.loss, out.loss.detach()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
    kl = distill_kl(out.logits[:, :-1], teacher_logits[:, :-1], temperature)
    loss = (1.0 - weight) * out.loss + weight * temperature**2 * kl
    return loss, out.loss.detach()
