"""Training losses: next-token cross-entropy, optionally mixed with distillation from a teacher.

Chunked cross-entropy: the output layer and the cross-entropy run together over chunks of
positions, so the (positions x vocabulary) fp32 logits never exist at once — at a 128 k vocabulary
and 32 k tokens per micro-batch that is 16 GB saved. The gradients of a chunk are computed in the
same pass (no recomputation in backward). `chunked_head` gives the model an output layer that
returns the final hidden states, and the loop passes that head to `training_loss` and `token_nll`,
which multiply by its weight chunk by chunk; the model's forward, hooks and wrappers (DDP, FSDP2 —
whose root unit stays gathered after forward, so the head weight is whole here) run as usual.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK_ROWS = 4096
"""Positions per chunk: logits of CHUNK_ROWS x vocabulary in fp32 at a time."""


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over rows of CE(hidden @ weightᵀ, targets), never holding all the logits."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]  # hidden (N, h), weight (V, h), targets (N,)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, CHUNK_ROWS):
            h = hidden[start : start + CHUNK_ROWS]
            t = targets[start : start + CHUNK_ROWS]
            logits = (h @ weight.t()).float()  # (n, V): one chunk in fp32
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            probs = torch.exp(logits - lse[:, None])  # d CE / d logits = softmax - onehot
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            probs /= rows
            if grad_hidden is not None:
                grad_hidden[start : start + CHUNK_ROWS] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.t() @ h.float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight.to(weight.dtype) if grad_weight is not None else torch.empty(0),
        )
        ctx.needs = (grad_hidden is not None, grad_weight is not None)
        return total / rows

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_out if ctx.needs[0] else None,
            grad_weight * grad_out if ctx.needs[1] else None,
            None,
        )


class HiddenStatesHead(torch.nn.Module):
    """The output layer of a model trained with the chunked loss: returns its input, the final hidden states
    (B, T, h), and holds the output weight (V, h) for the loss to multiply by, chunk by chunk. The weight is the
    replaced layer's own parameter: the same state-dict key, the same tie to the input embeddings."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def chunked_head(model: torch.nn.Module) -> HiddenStatesHead | None:
    """Replace `model`'s output layer by a HiddenStatesHead and return it, for `training_loss` and `token_nll`;
    None (nothing changed) where the logits are more than hidden @ weightᵀ (a bias, a logit scale, soft-capping)."""
    head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    plain = isinstance(head, torch.nn.Linear) and head.bias is None
    if not plain or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    chunked = HiddenStatesHead(head.weight)
    model.lm_head = chunked  # the same slot: parameter order, names and ties unchanged
    return chunked


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, head: HiddenStatesHead | None = None) -> torch.Tensor:
    """Next-token negative log-likelihood of every position, (B, T-1), without gradients; `head`: the model's
    chunked_head."""
    out = model(input_ids=input_ids, use_cache=False).logits
    targets = input_ids[:, 1:]
    if head is None:
        return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    hidden = out[:, :-1].flatten(0, 1)  # (B·(T-1), h): the output layer passed its input through
    nll = torch.cat([
        F.cross_entropy((h @ head.weight.t()).float(), t, reduction="none")
        for h, t in zip(hidden.split(CHUNK_ROWS), targets.flatten().split(CHUNK_ROWS), strict=True)
    ])  # fmt: skip
    return nll.view_as(targets)


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
    head: HiddenStatesHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy) for packed blocks of input_ids (B, T).

    Blocks are full and unpadded, so no attention mask is passed: the sdpa kernel then runs
    grouped-query attention natively instead of repeating K/V heads.
    With a teacher: loss = (1 - w)·CE + w·T²·KL(teacher || student). With `head`, the model's chunked_head (never
    with a teacher: distillation needs the logits), the cross-entropy runs chunked.
    """
    if head is not None:
        hidden = model(input_ids=input_ids, use_cache=False).logits  # (B, T, h)
        loss = ChunkedLinearCrossEntropy.apply(hidden[:, :-1].flatten(0, 1), head.weight, input_ids[:, 1:].flatten())
        return loss, loss.detach()
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    if teacher is None or weight == 0.0:
        return out.loss, out.loss.detach()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
    kl = distill_kl(out.logits[:, :-1], teacher_logits[:, :-1], temperature)
    loss = (1.0 - weight) * out.loss + weight * temperature**2 * kl
    return loss, out.loss.detach()
