"""Pool a group's source key/value heads into one shared head (Ainslie et al., 2023, §2).

Heads are grouped the way transformers' `repeat_kv` reads them: consecutive source KV heads
form a group, so query head h keeps reading the pooled version of the heads it read before.
All arithmetic is done in float32 and cast back by the caller.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

Method = Literal["mean", "first", "random", "svd"]
Role = Literal["weight", "bias", "norm"]
METHODS: tuple[str, ...] = ("mean", "first", "random", "svd")
Grouping = Literal["contiguous", "similarity"]
GROUPINGS: tuple[str, ...] = ("contiguous", "similarity")


def tensor_seed(seed: int, name: str) -> int:
    """A seed per tensor, so `random` init does not depend on the order tensors are visited."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def merge_heads(
    heads: torch.Tensor,
    num_groups: int,
    method: Method,
    role: Role,
    seed: int | None = None,
    std: float | None = None,
) -> torch.Tensor:
    """Pool per-head rows into `num_groups` shared heads.

    heads: (KV, d, *rest) — one slice per source KV head (rest = in_features for weights).
    Returns (G, d, *rest) in float32.
    - mean: average of the group's heads (the paper's choice).
    - first: the first head of each group.
    - random: fresh N(0, std²) weights (std of the source tensor unless given), zero biases;
      norm weights, which are not projections, are averaged as with `mean`.
    (`svd` merges a layer's heads jointly with its queries and outputs: see least_squares.py.)
    """
    kv = heads.shape[0]
    if kv % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {kv} heads")
    grouped = heads.float().unflatten(0, (num_groups, kv // num_groups))  # (G, r, d, *rest)
    if method == "first":
        return grouped[:, 0].clone()
    if method == "mean" or role == "norm":
        return grouped.mean(dim=1)
    if method == "random":
        shape = (num_groups, *grouped.shape[2:])
        if role == "bias":
            return torch.zeros(shape)
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        sigma = float(heads.float().std()) if std is None else std
        return torch.randn(shape, generator=gen) * sigma
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def merge_rows(ts: list[torch.Tensor], heads: int, groups: int, method: Method, role: Role, seed: int) -> torch.Tensor:
    """Rows laid out head by head, (heads·d, *rest) -> (groups·d, *rest)."""
    rows = ts[0].unflatten(0, (heads, -1))  # (KV, d, *rest)
    return merge_heads(rows, groups, method, role, seed).flatten(0, 1)


def merge_stacked(
    ts: list[torch.Tensor], heads: int, kv_heads: int, groups: int, method: Method, role: Role, seeds: tuple[int, int]
) -> torch.Tensor:
    """Fused rows [Q; K; V] (phi3): Q rows kept, K and V blocks pooled."""
    d = ts[0].shape[0] // (heads + 2 * kv_heads)
    q, k, v = ts[0].split([heads * d, kv_heads * d, kv_heads * d])
    k = merge_rows([k], kv_heads, groups, method, role, seeds[0])
    v = merge_rows([v], kv_heads, groups, method, role, seeds[1])
    return torch.cat([q.float(), k, v])


def merge_modules(ts: list[torch.Tensor], method: Method) -> torch.Tensor:
    """One norm module per KV head (stablelm): the group's modules -> one."""
    return merge_heads(torch.stack(ts), 1, method, "norm")[0]
