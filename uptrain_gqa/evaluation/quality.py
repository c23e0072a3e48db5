"""Perplexity of held-out text, and KL and top-1 agreement against a reference model on the same tokens.

The held-out text is one token stream (documents with EOS between them, as in training) scored in
windows of `window` tokens that start every `stride` tokens; each token is scored once, in the
window where it has the most context (the standard strided evaluation). A run's own held-out
blocks can be scored instead, each on its own, which reproduces the run's validation loss. With a
reference, both models see the same windows and the per-token KL(reference ‖ model) and top-1
agreement are averaged over the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from uptrain_gqa.device import input_device
from uptrain_gqa.evaluation.result import DataInfo, Domain, Quality

Window = tuple[torch.Tensor, int]  # (token ids (L,), first position scored in it)


def strided(tokens: torch.Tensor, window: int, stride: int) -> list[Window]:
    """Windows over a stream; every token but the first is scored exactly once (if stride < window)."""
    n, out, prev_end = len(tokens), [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((tokens[begin:end], first - begin))
        prev_end = end
        if end == n:
            break
    return out


Batch = tuple[torch.Tensor, torch.Tensor]  # (token ids (B, L), scored positions (B, L-1))


def batches(windows: list[Window], batch_size: int) -> Iterator[Batch]:
    """The windows in batches of equal length, in a fixed order (every model scored sees the same batches)."""
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(len(w[0]), []).append(w)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            ids = torch.stack([w[0] for w in chunk])  # (B, L)
            mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
            for i, (_, first) in enumerate(chunk):
                mask[i, first - 1 :] = True  # logits at p-1 predict token p, for p >= first
            yield ids, mask


def log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of the model's next-token logits, float32 (B, L-1, V), on the device the logits come out on."""
    return torch.log_softmax(model(input_ids=ids.to(input_device(model)), use_cache=False).logits[:, :-1].float(), -1)


@torch.no_grad()
def score(
    model: Any,
    windows: list[Window],
    batch_size: int,
    reference: Any = None,
    reference_log_probs: Callable[[int], torch.Tensor] | None = None,
    scored: Callable[[int], Any] | None = None,
) -> dict[str, float]:
    """Sum of NLL (and of the reference's NLL, KL and agreement) over the scored positions. The reference is a
    model run beside this one, or `reference_log_probs(b)`: batch b's log-probabilities, computed before.
    `scored(n)` hears of the n positions each batch scored (a progress bar)."""
    totals = dict.fromkeys(("nll", "ref_nll", "kl", "agree", "count"), 0.0)
    for b, (ids, mask) in enumerate(batches(windows, batch_size)):
        logp = log_probs(model, ids)
        ref = None
        if reference is not None:
            ref = log_probs(reference, ids).to(logp.device)
        elif reference_log_probs is not None:
            ref = reference_log_probs(b).to(logp.device)
        add_scores(totals, logp, ref, ids[:, 1:].to(logp.device), mask.to(logp.device))
        if scored is not None:
            scored(int(mask.sum()))
    return totals


def add_scores(
    totals: dict[str, float], logp: torch.Tensor, ref: torch.Tensor | None, target: torch.Tensor, mask: torch.Tensor
) -> None:
    """Adds one batch's sums over the scored positions `mask` (B, L-1): the model's NLL of `target`, and with
    the reference's log-probabilities `ref`, its NLL, KL(reference ‖ model) and top-1 agreement."""
    totals["nll"] -= logp.gather(-1, target[..., None]).squeeze(-1)[mask].sum().item()
    totals["count"] += mask.sum().item()
    if ref is not None:
        totals["ref_nll"] -= ref.gather(-1, target[..., None]).squeeze(-1)[mask].sum().item()
        # a position's KL is >= 0; a model equal to the reference sums to -1e-10 in float rounding
        totals["kl"] += (ref.exp() * (ref - logp)).sum(-1).clamp_min(0)[mask].sum().item()
        totals["agree"] += (ref.argmax(-1) == logp.argmax(-1))[mask].sum().item()


def quality(totals: dict[str, float], with_reference: bool) -> Quality:
    n = totals["count"]
    nll = totals["nll"] / n
    q = Quality(perplexity=math.exp(nll), nll=nll)
    if with_reference:
        q.reference_nll = totals["ref_nll"] / n
        q.reference_perplexity = math.exp(q.reference_nll)
        q.kl = totals["kl"] / n
        q.top1_agreement = totals["agree"] / n
    return q


def summary(domains: list[Domain]) -> tuple[DataInfo, Quality]:
    """Several texts as one: their data summed, and their mean quality, each text weighing the same (perplexity
    = exp of the mean NLL, so a text's share does not depend on how many tokens it had)."""
    first = domains[0].data
    data = DataInfo(
        ", ".join(f"{d.label} ({d.data.source})" for d in domains), first.mode,
        sum(d.data.tokens for d in domains), sum(d.data.windows for d in domains), first.window, first.stride,
    )  # fmt: skip
    qs = [d.quality for d in domains]

    def mean(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type,misc]

    nll = sum(q.nll for q in qs) / len(qs)
    q = Quality(perplexity=math.exp(nll), nll=nll)
    ref_nll = mean([x.reference_nll for x in qs])
    if ref_nll is not None:
        q.reference_nll, q.reference_perplexity = ref_nll, math.exp(ref_nll)
        q.kl, q.top1_agreement = mean([x.kl for x in qs]), mean([x.top1_agreement for x in qs])
    return data, q
