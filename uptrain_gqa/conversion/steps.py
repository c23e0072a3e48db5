"""The conversion as data: every output tensor, its spec, and how to make it from the source.

A `Step` names one output tensor and how to compute it; `ConversionSteps` is the whole output in
source order (built by `uptrain_gqa.conversion.convert.conversion_steps`). Nothing is computed until the
writer asks a step for its chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from uptrain_gqa.conversion.merge_method import MergeMethod
from uptrain_gqa.conversion.methods import Grouping, Method, merge_method
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.io.tensors import TensorSpec

Op = Callable[[list[torch.Tensor]], torch.Tensor]
CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MergeOptions:
    """What a conversion makes: G, and how each group's heads become one."""

    num_kv_heads: int
    """G, the KV heads to keep."""
    method: Method = "mean"
    grouping: Grouping = "contiguous"
    seed: int = 0
    """Seed of `random` (per tensor, see pooling.tensor_seed)."""

    @property
    def merge(self) -> MergeMethod:
        """The registered method named `method`."""
        return merge_method(self.method)

    @property
    def joint(self) -> bool:
        """A layer's q/k/v/o are merged together (a joint method, or heads reordered by similarity)."""
        return self.merge.joint or self.grouping == "similarity"


class LayerMerge(Protocol):
    """A layer whose tensors are computed together (uptrain_gqa.conversion.joint.JointLayer)."""

    layer: int
    errors: dict[str, Any] | None
    """Its groups and merge errors, once computed."""

    def compute(
        self, reader: CheckpointReader, sigma: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every output tensor of the layer by name (float32), merged with `sigma` (the layer's Σ̃; None: the
        identity), and the merge's groups and errors."""
        ...


@dataclass(frozen=True)
class Step:
    """How one output tensor is made: read `sources`, apply `op` (None = as stored), cast."""

    spec: TensorSpec
    sources: tuple[str, ...]
    op: Op | None = None
    job: Callable[[CheckpointReader], torch.Tensor] | None = None
    """Computes the tensor together with the rest of its layer (joint merges); overrides op."""

    @property
    def copied(self) -> bool:
        """Read from its one source as stored (cast at most), not computed."""
        return self.op is None and self.job is None

    def chunks(self, reader: CheckpointReader) -> Iterator[torch.Tensor]:
        """The output tensor in row pieces: copies stream through in chunks, merges come whole."""
        if self.job is not None:
            yield self.job(reader).to(self.spec.dtype)
        elif self.op is None:
            for piece in reader.read_chunks(self.sources[0]):
                yield piece.to(self.spec.dtype)
                del piece  # not held while the next one is read: one chunk in memory at a time
        else:
            yield self.op([reader.read(name) for name in self.sources]).to(self.spec.dtype)


@dataclass
class LayerSteps:
    """What one layer's attention changes: source tensors replaced (by one or more outputs), dropped,
    and the joint merges that compute some of them."""

    replaced: dict[str, list[Step]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    merges: list[LayerMerge] = field(default_factory=list)

    def add(self, other: LayerSteps) -> None:
        self.replaced |= other.replaced
        self.dropped |= other.dropped
        self.merges += other.merges


@dataclass
class ConversionSteps:
    """Every output tensor of a conversion, in source order."""

    steps: list[Step]
    layers: dict[int, LayerSteps] = field(default_factory=dict)
    """Each layer's attention steps as planned (in the source's dtypes), with the joint merge behind them."""

    @property
    def merges(self) -> list[LayerMerge]:
        """The joint layer merges behind some steps; each holds its layer's errors once computed."""
        return [m for one in self.layers.values() for m in one.merges]

    def cast(self, dtype: torch.dtype | None) -> ConversionSteps:
        """The same steps writing floating-point tensors in `dtype` (None: as stored)."""
        if dtype is None:
            return self
        steps = [
            dataclasses.replace(s, spec=TensorSpec(s.spec.name, dtype, s.spec.shape)) if s.spec.dtype in CASTABLE else s
            for s in self.steps
        ]
        return ConversionSteps(steps, self.layers)

    def made_by(self, jobs: Mapping[str, Callable[[CheckpointReader], torch.Tensor]]) -> ConversionSteps:
        """The same steps, the tensors named in `jobs` made by those jobs instead (layer-wise refinement)."""
        steps = [
            dataclasses.replace(s, sources=(), op=None, job=jobs[s.spec.name]) if s.spec.name in jobs else s
            for s in self.steps
        ]
        return ConversionSteps(steps, self.layers)

    @property
    def parameters(self) -> int:
        return sum(s.spec.numel for s in self.steps)

    def merge_errors(self) -> list[dict[str, Any]]:
        """Per layer that was merged jointly: its groups and the Σ-weighted errors of the merge and of mean pooling."""
        return [{"layer": m.layer, **m.errors} for m in self.merges if m.errors is not None]
