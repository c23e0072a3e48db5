"""Checks on the source: attention tensor shapes against config.json, and every value for NaN/inf.

Shapes are checked before anything is written; values while they stream through the conversion.

A checkpoint whose weights disagree with its config (wrong head count, head_dim, layer count, a
missing tensor) is refused with the tensor's name and both shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

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


class FiniteReader:
    """The checkpoint reader, checking every tensor it hands out for NaN and inf as it streams by.

    Non-finite values in an attention weight would spread through the merge into every head of its
    group (and make a least-squares merge fail), so they stop the conversion; elsewhere they pass
    through unchanged and are reported once per tensor."""

    def __init__(self, reader: Any, attention: Callable[[str], bool], warn: Callable[[str], None]) -> None:
        self.reader, self.attention, self.warn = reader, attention, warn
        self.reported: set[str] = set()

    def __getattr__(self, name: str) -> Any:  # tensors, num_parameters, ...: the reader's own
        return getattr(self.reader, name)

    def read(self, name: str) -> torch.Tensor:
        return self._checked(name, self.reader.read(name))

    def read_chunks(self, name: str, chunk_bytes: int | None = None) -> Iterator[torch.Tensor]:
        for chunk in self.reader.read_chunks(name, chunk_bytes):
            yield self._checked(name, chunk)

    def _checked(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            if self.attention(name):
                raise UptrainError(
                    f"{name} holds {bad:,} NaN/inf values; the source checkpoint is damaged (re-download it) "
                    "and its attention cannot be merged"
                )
            if name not in self.reported:
                self.reported.add(name)
                self.warn(f"warning: {name} holds {bad:,} NaN/inf values (copied unchanged; the source is damaged)")
        return t


def check_cast(name: str, chunk: torch.Tensor) -> torch.Tensor:
    """Refuse an output chunk a dtype cast made non-finite (the source was checked finite on reading)."""
    if chunk.is_floating_point() and not bool(torch.isfinite(chunk).all()):
        limit = torch.finfo(chunk.dtype).max
        raise UptrainError(
            f"casting {name} to {str(chunk.dtype).removeprefix('torch.')} overflows: it holds values beyond "
            f"±{limit:,.0f}; use --dtype bfloat16 (same range as float32) or keep the source dtype"
        )
    return chunk
