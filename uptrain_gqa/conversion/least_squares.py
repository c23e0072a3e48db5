"""Least-squares head merging with exact folding (`--method svd`), and head regrouping.

Notation (`ModelShape`): n source KV heads of head_dim d, G groups of r = n/G heads, t = H/n query
heads per source KV head, x̃ = [x; 1] the attention input with a 1 appended (biases), Σ = E[x̃ x̃ᵀ]
(from calibration text, random tokens, or the identity). Every tensor here is float32, rows laid out head by
head as in the checkpoint; weights carry their bias as a last column ("augmented", (rows, hidden+1)).

- V side: each head is first weighted by how o_proj reads it (W_i' = L_i W_i, LᵀL = Σ_q O_qᵀO_q);
  the group's stacked heads W'_cat (r·d × hidden+1) get the best Σ-weighted rank-d approximation
  U (Uᵀ W'_cat): Uᵀ W'_cat is the shared head, and head i's map M_i = L_i⁻¹ U_i is folded into the
  output-projection columns of the query heads that read it (O_q ← O_q M_i). The shared head and the
  maps are then rebalanced (h → A h, M_i → M_i A⁻¹; the same function) so that both keep the source's scales.
- K side: maps must commute with the rotary embedding. A rotary pair of dims is a complex number
  that RoPE multiplies by a phase, so per pair the group's complex rows get the best rank-1
  approximation c_i · k_g and conj(c_i) is folded into the query rows of the same pair. Dims
  outside the rotary part take a full d'×d' map, folded into the queries like V.
Mean pooling is a feasible point of both problems (M_i = I, c_i = 1), so the Σ-weighted error
here is never above mean pooling's.
"""

from __future__ import annotations

import torch

from uptrain_gqa.conversion.merge_method import LayerHeads, Merged, MergeMethod, Role, grouped
from uptrain_gqa.model.families import RotaryPairs
from uptrain_gqa.model.shape import ModelShape


def pair_index(rotary_dim: int, pairs: RotaryPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The (real, imaginary) dims of each rotary pair within a head."""
    half = rotary_dim // 2
    if pairs == "half":
        return torch.arange(half), torch.arange(half) + half
    return torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)


def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, hidden) and (rows,) -> (rows, hidden+1)."""
    b = torch.zeros(weight.shape[0]) if bias is None else bias.float()
    return torch.cat([weight.float(), b[:, None]], dim=1)


def identity_sigma(hidden: int) -> torch.Tensor:
    return torch.eye(hidden + 1)


def _energy(w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E‖w x̃‖² summed over rows: tr(w Σ wᵀ)."""
    return torch.einsum("ij,jk,ik->", w, sigma, w)


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    return w.unflatten(0, (n, -1))  # (n, d, hidden+1)


# --- grouping ------------------------------------------------------------------------------------


def similarity_order(
    k: torch.Tensor, v: torch.Tensor, shape: ModelShape, groups: int, sigma: torch.Tensor
) -> list[int]:
    """An order of the source KV heads in which each run of r heads is a group of similar heads:
    greedily, the first free head with its r-1 nearest free heads (Σ-weighted distance of K and V,
    each side scaled by its energy). A cheap proxy for the grouping that minimises the merge error."""
    n, r = shape.kv_heads, shape.group_size(groups)
    dist = torch.zeros(n, n)
    for w in (k, v):
        h = _heads(w, n)  # (n, d, hidden+1)
        gram = torch.einsum("adj,jk,bdk->ab", h, sigma, h)  # (n, n): E<w_a x̃, w_b x̃>
        diag = gram.diagonal()
        dist += (diag[:, None] + diag[None, :] - 2 * gram) / diag.sum().clamp_min(1e-30)
    free, order = list(range(n)), []
    while free:
        seed = free.pop(0)
        nearest = sorted(free, key=lambda j: (float(dist[seed, j]), j))[: r - 1]
        free = [j for j in free if j not in nearest]
        order += [seed, *sorted(nearest)]
    return order


def permute_rows(w: torch.Tensor, order: list[int], per: int) -> torch.Tensor:
    """Reorder blocks of `per` rows: block k of the result is block order[k] of w."""
    return w.unflatten(0, (len(order), per))[order].flatten(0, 1)


def query_order(order: list[int], t: int) -> list[int]:
    """The query-head order that moves each query head with the KV head it reads."""
    return [kv * t + j for kv in order for j in range(t)]


def _best_rank(cat: torch.Tensor, sigma: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best Σ-weighted rank-k approximation cat ≈ u (uᵀ cat) of stacked head rows (r·k, hidden+1):
    u (r·k, k) the top-k eigenvectors of cat Σ catᵀ, the shared head uᵀ cat, and the error left."""
    vals, vecs = torch.linalg.eigh((cat @ sigma @ cat.T).double())
    u = vecs[:, -k:].flip(1).float()
    return u, u.T @ cat, float((vals.sum() - vals[-k:].sum()).clamp_min(0))


def _readers(kv_head: int, t: int) -> range:
    """The query heads that read a source KV head (repeat_kv)."""
    return range(kv_head * t, (kv_head + 1) * t)


def _balance(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A and A⁻¹ (k, k) that re-express a shared head h as A h, each head's map m becoming m A⁻¹: the same
    function, in the gauge where the maps preserve norms on average (mean (m A⁻¹)ᵀ(m A⁻¹) = I), so the shared head
    has the scale of the heads it replaces and the projections the maps are folded into keep theirs. Without it
    the least-squares head carries o_proj's scale, and gradient steps on o_proj, in refinement and in uptraining,
    are that much larger relative to its weights (docs/results.md)."""
    gram = sum(m.double().T @ m.double() for m in maps) / len(maps)  # (k, k), positive definite
    vals, vecs = torch.linalg.eigh(gram)
    root = vals.clamp_min(1e-30).sqrt()
    return ((vecs * root) @ vecs.T).float(), ((vecs / root) @ vecs.T).float()


# --- V side --------------------------------------------------------------------------------------


def _mean_pool(w: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A group's mean head (d, hidden+1) and its Σ-weighted error over the group's heads w (r, d, hidden+1)."""
    mean = w.mean(0)
    return mean, float(_energy((w - mean).flatten(0, 1), sigma))


def _output_maps(o: torch.Tensor, kv_head: int, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L and L⁻¹ (d, d) with LᵀL = Σ_q O_qᵀ O_q over the query heads q that read `kv_head`: an error e in the
    head's values costs ‖L e‖² at o_proj's output, so the V fit is weighted by how o_proj uses each head."""
    cols = o[:, kv_head * t * d : (kv_head + 1) * t * d].unflatten(1, (t, d)).double()  # (hidden, t, d)
    a = torch.einsum("xtd,xte->de", cols, cols)  # (d, d)
    a = a + 1e-6 * a.trace().clamp_min(1e-30) / d * torch.eye(d, dtype=a.dtype)  # dead heads stay invertible
    vals, vecs = torch.linalg.eigh(a)
    root = vals.clamp_min(1e-30).sqrt()
    return ((vecs * root) @ vecs.T).float(), ((vecs / root) @ vecs.T).float()


def merge_v(
    v: torch.Tensor, o: torch.Tensor, shape: ModelShape, groups: int, sigma: torch.Tensor, fit: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Merge V heads and fold the per-head maps into o_proj (`fit` False: mean pooling, measured alike).

    The fit is weighted by the input (Σ) and by o_proj: head i's error counts as ‖L_i (W_i − M_i W_g) x̃‖²,
    LᵀL the Gram matrix of the o_proj columns that read it (docs/results.md compares it with an unweighted
    fit). Substituting W_i' = L_i W_i makes it the plain rank-d problem.

    v: (n·d, hidden+1) augmented; o: (hidden, H·d). Returns (v_new (G·d, hidden+1), o_new,
    relative error of this merge, relative error of mean pooling), both measured at o_proj's output."""
    n, g, r, d, t = shape.kv_heads, groups, shape.group_size(groups), shape.head_dim, shape.queries_per_kv_head
    heads = _heads(v, n)
    maps = [_output_maps(o, i, t, d) for i in range(n)]
    weighted = torch.stack([maps[i][0] @ heads[i] for i in range(n)])  # (n, d, hidden+1): L_i W_i
    total = float(_energy(weighted.flatten(0, 1), sigma).clamp_min(1e-30))
    mean_err, err = 0.0, 0.0
    shared, o_new = [], o.clone()
    for grp in range(g):
        members = range(grp * r, (grp + 1) * r)
        mean = heads[grp * r : (grp + 1) * r].mean(0)  # (d, hidden+1)
        mean_err += float(_energy(torch.cat([weighted[i] - maps[i][0] @ mean for i in members]), sigma))
        if not fit:
            shared.append(mean)
            continue
        u, head, e = _best_rank(weighted[grp * r : (grp + 1) * r].flatten(0, 1), sigma, d)  # u: (r·d, d)
        err += e
        ms = [maps[i][1] @ u[j * d : (j + 1) * d] for j, i in enumerate(members)]  # (d, d) each: head i ≈ m @ shared
        a, a_inv = _balance(ms)
        shared.append(a @ head)
        for m, i in zip(ms, members, strict=True):
            for q in _readers(i, t):
                o_new[:, q * d : (q + 1) * d] = o[:, q * d : (q + 1) * d] @ (m @ a_inv)
    if not fit:
        err = mean_err
    return torch.cat(shared), o_new, err / total, mean_err / total


# --- K side --------------------------------------------------------------------------------------


def merge_k(
    k: torch.Tensor,
    q: torch.Tensor,
    shape: ModelShape,
    groups: int,
    pairs: RotaryPairs,
    sigma: torch.Tensor,
    fit: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Merge K heads with maps that commute with RoPE, folded into the query rows (`fit` False: mean pooling).

    k: (n·d, hidden+1), q: (H·d, hidden+1), both augmented. Returns (k_new (G·d, hidden+1),
    q_new, relative error, relative error of mean pooling)."""
    n, g, r, d, t = shape.kv_heads, groups, shape.group_size(groups), shape.head_dim, shape.queries_per_kv_head
    heads = _heads(k, n)
    qh = _heads(q, shape.heads).clone()  # (H, d, hidden+1)
    total = float(_energy(k, sigma).clamp_min(1e-30))
    re, im = pair_index(shape.rotary_dim, pairs)
    rest = torch.arange(shape.rotary_dim, d)
    csigma = sigma.to(torch.complex128)
    shared, err, mean_err = [], 0.0, 0.0
    for grp in range(g):
        w = heads[grp * r : (grp + 1) * r]  # (r, d, hidden+1)
        mean, e_mean = _mean_pool(w, sigma)
        mean_err += e_mean
        if not fit:
            shared.append(mean)
            continue
        new = torch.empty_like(mean)
        # rotary pairs: complex rank-1 per pair, c_i folded as conj(c_i) into the query pair
        z = torch.complex(w[:, re].double(), w[:, im].double())  # (r, P, hidden+1)
        for p in range(len(re)):
            c = z[:, p]  # (r, hidden+1)
            gram = c @ csigma @ c.conj().T  # (r, r) Hermitian
            vals, vecs = torch.linalg.eigh(gram)
            # the rank-1 fit c ≈ u (uᴴ c) with |u| = 1, rebalanced (see _balance): k_g = uᴴc/√r and u·√r, so the
            # query pairs the maps are folded into keep their scale on average
            u = vecs[:, -1] * r**0.5  # (r,)
            kg = u.conj() @ c / r  # (hidden+1,)
            new[re[p]], new[im[p]] = kg.real.float(), kg.imag.float()
            err += float((vals.real.sum() - vals.real[-1]).clamp_min(0))
            for i in range(r):
                cr, ci = float(u[i].real), float(u[i].imag)
                for qi in _readers(grp * r + i, t):
                    a, b = qh[qi, re[p]].clone(), qh[qi, im[p]].clone()
                    qh[qi, re[p]], qh[qi, im[p]] = cr * a + ci * b, cr * b - ci * a
        # dims the rotary embedding leaves alone: a full map, folded into the queries as with V
        if len(rest):
            dr = len(rest)
            u, head, e = _best_rank(w[:, rest].flatten(0, 1), sigma, dr)  # u: (r·d', d')
            err += e
            ms = [u[i * dr : (i + 1) * dr] for i in range(r)]  # (d', d') each: head i ≈ m @ shared
            a, a_inv = _balance(ms)
            new[rest] = a @ head
            for i, m in enumerate(ms):
                for qi in _readers(grp * r + i, t):
                    qh[qi, rest] = (m @ a_inv).T @ qh[qi, rest]
        shared.append(new)
    if not fit:
        err = mean_err
    return torch.cat(shared), qh.flatten(0, 1), err / total, mean_err / total


# --- the method ----------------------------------------------------------------------------------


class LeastSquares(MergeMethod):
    """`svd`: least-squares shared heads with per-head maps folded exactly into the query and output projections,
    weighted by the layer's inputs Σ; key norms are pooled by mean."""

    name = "svd"
    joint = True

    def pool(self, heads: torch.Tensor, groups: int, role: Role, seed: int | None) -> torch.Tensor:
        if role != "norm":
            raise ValueError("svd merges a layer's heads jointly (solve), not tensor by tensor")
        return grouped(heads, groups).mean(dim=1)

    def solve(self, heads: LayerHeads) -> Merged:
        h, s, g = heads, heads.shape, heads.groups
        k, q, k_err, k_mean = merge_k(h.k, h.q, s, g, h.pairs, h.sigma, fit=h.fold_k)
        v, o, v_err, v_mean = merge_v(h.v, h.o, s, g, h.sigma, fit=True)
        return Merged(q, k, v, o, k_err, k_mean, v_err, v_mean, folded=h.fold_k)
