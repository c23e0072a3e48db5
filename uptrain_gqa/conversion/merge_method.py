"""What a merge method is: one object saying how a group of source K/V heads becomes one shared head.

A method pools each K/V tensor on its own (`pool`, also used for key norms by every method), or, when it is
`joint`, merges a layer's K and V together with its Q and O (`solve`: per-head maps folded into them, weighted
by the layer's inputs Σ). Methods are registered by name in `conversion/methods.py`: a new method is one class
and one line there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from uptrain_gqa.model.families import RotaryPairs
from uptrain_gqa.model.shape import ModelShape

Role = Literal["weight", "bias", "norm"]


@dataclass(frozen=True)
class LayerHeads:
    """One layer's attention, as a joint merge reads it: float32 rows laid out head by head, weights augmented with
    their bias as a last column (rows, hidden+1); o is o_proj's weight (hidden, H·d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    shape: ModelShape
    groups: int
    """G, the KV heads to keep."""
    sigma: torch.Tensor
    """Σ̃ (hidden+1, hidden+1) of the layer's attention input."""
    pairs: RotaryPairs
    fold_k: bool
    """Maps may be folded into the query rows (False with per-head key norms between them)."""
    seeds: tuple[int, int]
    """Per-tensor seeds of the K and V merges (pooling.tensor_seed)."""


@dataclass(frozen=True)
class Merged:
    """A joint merge's q/k/v/o (augmented as in LayerHeads, G KV heads) and its relative Σ-weighted errors."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    k_error: float | None
    k_mean: float
    """Mean pooling's error on the same heads, for comparison."""
    v_error: float | None
    v_mean: float
    folded: bool
    """Per-head K maps were folded into the queries."""


class MergeMethod(ABC):
    """How each group's heads become one (the `--method` choices)."""

    name: ClassVar[str]
    joint: ClassVar[bool] = False
    """Merges K and V with the layer's Q and O (maps folded into them, weighted by Σ: it reads calibration);
    False: each K/V tensor is pooled on its own."""

    @abstractmethod
    def pool(self, heads: torch.Tensor, groups: int, role: Role, seed: int | None) -> torch.Tensor:
        """Per-head rows (KV, d, *rest) -> `groups` shared heads (G, d, *rest), float32. Key norms (`role`
        "norm") are not projections: every method pools them too."""

    @abstractmethod
    def solve(self, heads: LayerHeads) -> Merged:
        """One layer's K/V merged into G heads (with similarity grouping, or for a joint method)."""


def grouped(heads: torch.Tensor, groups: int) -> torch.Tensor:
    """(KV, d, *rest) -> (G, r, d, *rest) float32: consecutive heads form a group, as repeat_kv reads them."""
    return heads.float().unflatten(0, (groups, heads.shape[0] // groups))
