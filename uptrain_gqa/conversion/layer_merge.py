"""Each layer merged (and refined) once, while the pass holds it: one result per layer, written or measured.

A `Visitor` of conversion/walk.py, one per G: the closed form with the layer's Σ, fitted to the source's
attention when refining, and the one result kept for the layer: spilled for `convert` to write, handed on for
`plan --quality` to measure. Nothing is computed again later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from uptrain_gqa.conversion.layered import LayerState, SourceAttention
from uptrain_gqa.conversion.refine import ConvertedAttention, Refinement, refine_attention
from uptrain_gqa.conversion.spill import LayerStore
from uptrain_gqa.conversion.steps import LayerSteps
from uptrain_gqa.model.families import Architecture


class LayerMerger:
    """Merges each layer of `plan` (the attention steps for G KV heads, as planned once) with its Σ.

    `refinement`: each merged attention is refined on the calibration windows and keeps the result only where it
    lowers the held-out error. `store` (convert): what the layer keeps is spilled there, cast to `dtypes` (the
    output's, by name), for the writer. `hand_on` (plan --quality): it is left on the layer's state as well,
    as the source's dtypes hold it."""

    units = 0

    def __init__(
        self,
        reader: Any,
        arch: Architecture,
        plan: Mapping[int, LayerSteps],
        num_kv_heads: int,
        refinement: Refinement | None = None,
        store: tuple[LayerStore, Mapping[str, torch.dtype]] | None = None,
        hand_on: bool = False,
    ) -> None:
        self.reader, self.plan, self.num_kv_heads = reader, plan, num_kv_heads
        self.refinement, self.store, self.hand_on = refinement, store, hand_on
        self.windows: list[torch.Tensor] = []
        self.label = "refinement" if refinement is not None else ""
        self.keeps_windows = refinement is not None
        self.converted = ConvertedAttention(reader, arch, num_kv_heads) if refinement is not None else None
        self.layers: list[dict[str, Any]] = []
        """Per layer: the closed-form merge's groups and errors, and what refinement did."""
        self.held_out: list[str] = []
        """The calibration texts of the windows that decide whether a layer keeps its refinement."""
        self._seen: list[SourceAttention] = []
        self._module: torch.nn.Module | None = None

    def begin(self, source: Any, first: int) -> None:
        pass

    def window(self, layer: int, seen: SourceAttention) -> None:
        if self.keeps_windows:
            self._seen.append(seen)

    def layer(self, state: LayerState, done: Callable[[], None]) -> None:
        i, steps = state.index, self.plan[state.index]
        (merge,) = steps.merges
        out, errors = merge.compute(self.reader, state.sigma)  # float32, what the writer casts
        merge.errors = errors
        entry: dict[str, Any] = {"layer": i, **errors}
        kept, handed = out, None
        if self.converted is not None or self.hand_on:
            handed = self._as_source(steps, out)
        if self.converted is not None and self.refinement is not None and handed is not None:
            # fitted on the source's own attention inputs (docs/results.md compares it with the converted layers')
            self._module = self.converted.load(i, handed)
            result = refine_attention(self._module, self._seen, self.refinement)
            self._seen = []
            self.held_out = result.pop("held_out")  # the same windows for every layer
            entry["refinement"] = result
            handed = self.converted.tensors(i, self._module)  # refined, or the closed form it was reset to
            if result["kept"]:
                kept = handed
        self.layers.append(entry)
        if self.store is not None:
            store, dtypes = self.store
            store.put(i, {name: t.detach().cpu().to(dtypes[name]) for name, t in kept.items()})
        if self.hand_on and handed is not None:
            state.converted[self.num_kv_heads] = handed

    def release(self, state: LayerState) -> None:
        if self._module is not None and self.converted is not None:
            self.converted.release(self._module)
            self._module = None

    def _as_source(self, steps: LayerSteps, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor the layer's steps replace, in the source's dtype (what refinement starts from)."""
        return {
            step.spec.name: torch.cat(
                [out[step.spec.name].to(step.spec.dtype)] if step.job is not None else list(step.chunks(self.reader))
            ).reshape(step.spec.shape)
            for replaced in steps.replaced.values()
            for step in replaced
        }

    def record(self) -> dict[str, Any]:
        """What refinement did, for the conversion record (with `refinement` only)."""
        assert self.refinement is not None
        done = [r["refinement"] for r in self.layers]
        return self.refinement.record() | {
            "held_out": self.held_out,
            "layers_improved": sum(r["kept"] for r in done),
            "seconds": round(sum(r["seconds"] for r in done), 3),
        }
