"""One layer's attention merged jointly: a joint method (`svd`), or any method with similarity grouping.

Without a calibration pass, the layer's q/k/v/o tensors (and biases) are read and computed together when the
writer asks for the first of them (Σ the identity), handed out one by one, then dropped. With one, the pass
computes the layer with its Σ (`compute`) and the writer hands out what the pass kept. The merge keeps its
groups and errors (`errors`) for the conversion record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from uptrain_gqa.conversion.least_squares import augment, identity_sigma, permute_rows, query_order, similarity_order
from uptrain_gqa.conversion.merge_method import LayerHeads
from uptrain_gqa.conversion.pooling import tensor_seed
from uptrain_gqa.conversion.steps import MergeOptions
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import RotaryPairs
from uptrain_gqa.model.shape import ModelShape


class JointLayer:
    """q/k/v/o of layer `layer`, keyed by role: q, k, v (or qkv, stacked [Q; K; V]), o, and `_b` biases."""

    def __init__(
        self,
        layer: int,
        names: dict[str, str],
        shape: ModelShape,
        options: MergeOptions,
        pairs: RotaryPairs,
        fold_k: bool,
    ) -> None:
        self.layer, self.names, self.shape, self.options = layer, names, shape, options
        self.pairs, self.fold_k = pairs, fold_k
        self.errors: dict[str, Any] | None = None
        self._out: dict[str, torch.Tensor] | None = None

    def tensor(self, name: str) -> Callable[[CheckpointReader], torch.Tensor]:
        """A step's job: the output tensor `name`, computing the whole layer (Σ the identity) on first use."""

        def get(reader: CheckpointReader) -> torch.Tensor:
            if self._out is None:
                self._out, self.errors = self.compute(reader)
            return self._out.pop(name)

        return get

    def compute(
        self, reader: CheckpointReader, sigma: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every output tensor of the layer by name (float32), merged with `sigma` (the layer's Σ̃ (hidden+1,
        hidden+1); None: every input direction counts alike), and the merge's groups and relative errors."""
        try:
            return self._compute(reader, identity_sigma(self.shape.hidden) if sigma is None else sigma)
        except torch.linalg.LinAlgError as e:  # non-finite or degenerate layer inputs (Σ) or weights
            raise UptrainError(
                f"the least-squares merge of layer {self.layer} failed ({str(e).splitlines()[0][:80]}); its "
                "inputs are degenerate or non-finite: check the source, or use --method mean"
            ) from e

    def _compute(self, reader: CheckpointReader, sigma: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        s, opt, n = self.shape, self.options, self.names
        d, g = s.head_dim, opt.num_kv_heads
        r = s.group_size(g)
        read = {key: reader.read(name).float() for key, name in n.items()}
        if "qkv" in read:  # fused rows [Q; K; V]
            q_w, k_w, v_w = read["qkv"].split([s.heads * d, s.kv_heads * d, s.kv_heads * d])
            q_b, k_b, v_b = read["qkv_b"].split([len(q_w), len(k_w), len(v_w)]) if "qkv_b" in read else (None,) * 3
        else:
            q_w, k_w, v_w = read["q"], read["k"], read["v"]
            q_b, k_b, v_b = read.get("q_b"), read.get("k_b"), read.get("v_b")
        q, k, v, o = augment(q_w, q_b), augment(k_w, k_b), augment(v_w, v_b), read["o"]  # (rows, hidden+1)
        order = list(range(s.kv_heads))
        if opt.grouping == "similarity":
            order = similarity_order(k, v, s, g, sigma)
            qo = query_order(order, s.queries_per_kv_head)
            k, v, q = permute_rows(k, order, d), permute_rows(v, order, d), permute_rows(q, qo, d)
            o = permute_rows(o.T, qo, d).T
        seeds = (
            tensor_seed(opt.seed, n.get("k", n.get("qkv", ""))),
            tensor_seed(opt.seed, n.get("v", n.get("qkv", "")) + ":v"),
        )
        m = opt.merge.solve(LayerHeads(q, k, v, o, s, g, sigma, self.pairs, self.fold_k, seeds))
        q, k, v, o = m.q, m.k, m.v, m.o
        errors = {
            "groups": [order[i * r : (i + 1) * r] for i in range(g)],
            "k": {"error": m.k_error, "mean_pooling_error": m.k_mean, "folded": m.folded},
            "v": {"error": m.v_error, "mean_pooling_error": m.v_mean},
        }
        out = {"o": o}
        if "qkv" in read:
            out["qkv"] = torch.cat([q[:, :-1], k[:, :-1], v[:, :-1]])
            if "qkv_b" in read:
                out["qkv_b"] = torch.cat([q[:, -1], k[:, -1], v[:, -1]])
        else:
            out |= {"q": q[:, :-1], "k": k[:, :-1], "v": v[:, :-1]}
            out |= {f"{key}_b": t[:, -1] for key, t in (("q", q), ("k", k), ("v", v)) if f"{key}_b" in read}
        return {n[key]: t for key, t in out.items()}, errors
