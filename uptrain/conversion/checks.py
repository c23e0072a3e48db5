"""Every attention tensor checked against the shape config.json implies, before anything is written.

A checkpoint whose weights disagree with its config (wrong head count, head_dim, layer count, a
missing tensor) is refused with the tensor's name and both shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from uptrain.errors import UptrainError
from uptrain.io.tensors import TensorInfo
from uptrain.model.shape import ModelShape


class TensorChecks:
    """Lookups and shape checks over a checkpoint's tensor headers."""

    def __init__(self, tensors: Mapping[str, TensorInfo], shape: ModelShape) -> None:
        self.tensors, self.shape = tensors, shape

    def tensor(self, name: str, required: bool = False) -> TensorInfo | None:
        info = self.tensors.get(name)
        if info is None and required:
            raise UptrainError(
                f"the checkpoint has no tensor {name}, which a {self.shape.model_type} model with "
                f"{self.shape.layers} layers needs; config.json and the weights do not match"
            )
        return info

    def rows(self, info: TensorInfo, rows: int, what: str) -> None:
        """A projection (or its bias) with `rows` output rows over the hidden size."""
        s = self.shape
        ok = info.shape[:1] == (rows,) and (len(info.shape) == 1 or info.shape[1:] == (s.hidden,))
        if not ok:
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies {rows} rows "
                f"({what}, head_dim {s.head_dim}, hidden {s.hidden}); config and weights disagree"
            )

    def output_projection(self, info: TensorInfo) -> None:
        s = self.shape
        if info.shape != (s.hidden, s.heads * s.head_dim):
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies "
                f"{[s.hidden, s.heads * s.head_dim]}"
            )

    def norm(self, info: TensorInfo, expected: tuple[int, ...]) -> None:
        if info.shape != expected:
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies {list(expected)} "
                f"({self.shape.kv_heads} KV heads, head_dim {self.shape.head_dim}); config and weights disagree"
            )

    def no_extra_layers(self, attention: str) -> None:
        """Attention tensors of layers beyond config's count would be copied unconverted.
        `attention` is the family's prefix template, e.g. 'model.layers.{layer}.self_attn'."""
        pattern = re.compile(re.escape(attention).replace(re.escape("{layer}"), r"(\d+)") + r"\.")
        for name in self.tensors:
            m = pattern.match(name)
            if m and int(m.group(1)) >= self.shape.layers:
                raise UptrainError(
                    f"the checkpoint has {name} but config.json says {self.shape.layers} layers; "
                    "config and weights disagree"
                )
