"""Pool a group's source key/value heads into one shared head (Ainslie et al., 2023, §2).

The methods `mean`, `first` and `random`.

Heads are grouped the way transformers' `repeat_kv` reads them: consecutive source KV heads
form a group, so query head h keeps reading the pooled version of the heads it read before.
All arithmetic is done in float32 and cast back by the caller.
"""

from __future__ import annotations

import hashlib

import torch

from uptrain_gqa.conversion.least_squares import merge_k, merge_v
from uptrain_gqa.conversion.merge_method import LayerHeads, Merged, MergeMethod, Role, grouped


def tensor_seed(seed: int, name: str) -> int:
    """A seed per tensor, so `random` init does not depend on the order tensors are visited."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Pooling(MergeMethod):
    """A method that pools each tensor's heads; with similarity grouping its layer is merged in the regrouped
    order, and mean pooling's Σ-weighted error is measured beside it."""

    reports_error = False
    """Its own error is mean pooling's, reported as such (only `mean`)."""

    def solve(self, heads: LayerHeads) -> Merged:
        h, s, g = heads, heads.shape, heads.groups
        _, _, k_err, k_mean = merge_k(h.k, h.q, s, g, h.pairs, h.sigma, fit=False)
        _, _, v_err, v_mean = merge_v(h.v, h.o, s, g, h.sigma, fit=False)
        k = merge_rows([h.k], s.kv_heads, g, self, "weight", h.seeds[0])
        v = merge_rows([h.v], s.kv_heads, g, self, "weight", h.seeds[1])
        if not self.reports_error:
            k_err = v_err = None
        return Merged(h.q, k, v, h.o, k_err, k_mean, v_err, v_mean, folded=False)


class Mean(Pooling):
    """The average of the group's heads (the paper's choice)."""

    name = "mean"
    reports_error = True

    def pool(self, heads: torch.Tensor, groups: int, role: Role, seed: int | None) -> torch.Tensor:
        return grouped(heads, groups).mean(dim=1)


class First(Pooling):
    """The first head of each group."""

    name = "first"

    def pool(self, heads: torch.Tensor, groups: int, role: Role, seed: int | None) -> torch.Tensor:
        return grouped(heads, groups)[:, 0].clone()


class RandomInit(Pooling):
    """Fresh N(0, std²) weights (the source tensor's std), zero biases; norms averaged as with `mean`."""

    name = "random"

    def pool(self, heads: torch.Tensor, groups: int, role: Role, seed: int | None) -> torch.Tensor:
        rows = grouped(heads, groups)
        if role == "norm":
            return rows.mean(dim=1)
        shape = (groups, *rows.shape[2:])
        if role == "bias":
            return torch.zeros(shape)
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        return torch.randn(shape, generator=gen) * float(heads.float().std())

    def solve(self, heads: LayerHeads) -> Merged:
        merged = super().solve(heads)
        merged.k[:, -1], merged.v[:, -1] = 0.0, 0.0  # the bias column: zero biases
        return merged


def merge_heads(
    heads: torch.Tensor, num_groups: int, method: MergeMethod, role: Role, seed: int | None = None
) -> torch.Tensor:
    """Pool per-head rows into `num_groups` shared heads: (KV, d, *rest) -> (G, d, *rest) in float32."""
    if heads.shape[0] % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {heads.shape[0]} heads")
    return method.pool(heads, num_groups, role, seed)


def merge_rows(
    ts: list[torch.Tensor], heads: int, groups: int, method: MergeMethod, role: Role, seed: int
) -> torch.Tensor:
    """Rows laid out head by head, (heads·d, *rest) -> (groups·d, *rest)."""
    rows = ts[0].unflatten(0, (heads, -1))  # (KV, d, *rest)
    return merge_heads(rows, groups, method, role, seed).flatten(0, 1)


def merge_stacked(
    ts: list[torch.Tensor],
    heads: int,
    kv_heads: int,
    groups: int,
    method: MergeMethod,
    role: Role,
    seeds: tuple[int, int],
) -> torch.Tensor:
    """Fused rows [Q; K; V] (phi3): Q rows kept, K and V blocks pooled."""
    d = ts[0].shape[0] // (heads + 2 * kv_heads)
    q, k, v = ts[0].split([heads * d, kv_heads * d, kv_heads * d])
    k = merge_rows([k], kv_heads, groups, method, role, seeds[0])
    v = merge_rows([v], kv_heads, groups, method, role, seeds[1])
    return torch.cat([q.float(), k, v])


def merge_modules(ts: list[torch.Tensor], method: MergeMethod) -> torch.Tensor:
    """One norm module per KV head (stablelm): the group's modules -> one."""
    return merge_heads(torch.stack(ts), 1, method, "norm")[0]
