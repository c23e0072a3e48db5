"""What each G costs in quality before any checkpoint is written (`uptrain plan --quality`).

One pass over the source, one decoder layer at a time (conversion/walk.py), with the visitors `convert
--calibration` runs: while a layer is loaded, the calibration windows give its Σ, each G's merge is made (and
refined) as `convert --method svd` makes it, in memory, and then `_HeldOut` runs the held-out windows through
the layer twice over: as the source has it, and with each G's merge in its place (nothing written).
Memory holds one layer's weights, its G merges, the calibration hidden states, and the held-out
hidden states once per G and once for the source. At the end each path's logits are scored against
the source's on the same positions: the KL and top-1 agreement that `uptrain eval --reference SOURCE`
reports on the converted checkpoint.

Before any of it, `check_held_out_tokens` refuses a held-out count whose hidden states would not fit in memory.
Nothing is written to disk: each layer's Σ and merges live while the layer does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from uptrain_gqa.conversion.calibrate import Calibration, Covariance
from uptrain_gqa.conversion.layer_merge import LayerMerger
from uptrain_gqa.conversion.layered import LayeredSource, LayerState, SourceAttention
from uptrain_gqa.conversion.methods import RECOMMENDED
from uptrain_gqa.conversion.preflight import attention_plan
from uptrain_gqa.conversion.refine import Refinement
from uptrain_gqa.conversion.steps import MergeOptions
from uptrain_gqa.conversion.walk import calibration_pass
from uptrain_gqa.device import available_memory, compute_device, device_name, inference_dtype
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import Architecture
from uptrain_gqa.model.shape import ModelShape
from uptrain_gqa.units import format_bytes

Window = tuple[torch.Tensor, int]  # (token ids (L,), first position scored in it)
Scorer = Callable[[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Adds one batch's sums to totals: (totals, log-probs of the model, of the reference, targets, scored mask)."""


def held_out_bytes_per_token(shape: ModelShape, merges: int, itemsize: int) -> int:
    """Memory `merge_quality` holds per held-out token until the end: its hidden states as they enter the first
    layer, along the source's path and along each of `merges` merges' (`itemsize` bytes each), its token and
    position ids, and its rotary tables."""
    return (merges + 2) * shape.hidden * itemsize + 2 * 8 + 2 * shape.head_dim * 4


def check_held_out_tokens(
    shape: ModelShape, merges: int, tokens: int, texts: int = 1, flag: str = "--quality-tokens"
) -> None:
    """Refuse, before anything is allocated, `tokens` held-out tokens of each of `texts` texts whose hidden states
    (through the source and `merges` merges) would not fit in the memory of the device they run on."""
    device = compute_device()
    per_token = held_out_bytes_per_token(shape, merges, inference_dtype(device).itemsize)
    free = available_memory(device)
    if free is None or tokens * texts * per_token <= free:
        return
    most = max(0, free // (per_token * texts))
    each = " of each text" if texts > 1 else ""
    where = "in memory" if device.type == "cpu" else f"on {device_name(device)}"
    raise UptrainError(
        f"{flag} {tokens:,} needs about {format_bytes(tokens * texts * per_token)} for the held-out hidden states"
        f"{each} (the source and {merges} merge(s), {format_bytes(per_token)} a token), more than the "
        f"{format_bytes(free)} free {where}: at most {most:,} fit; lower {flag}"
    )


HELD_OUT_BATCH = 4
"""Held-out windows run through a layer at a time."""


@torch.no_grad()
def merge_quality(
    reader: CheckpointReader,
    arch: Architecture,
    shape: ModelShape,
    groups: list[int],
    calibration: Calibration,
    held: dict[str, list[Window]],
    add_scores: Scorer,
    refinement: Refinement | None = None,
    quiet: bool = False,
) -> dict[int, dict[str, dict[str, float]]]:
    """{G: {text: the scorer's totals of the source (reference) against its G-head merge}} over each held-out
    text's windows. With `refinement`, each G's merge is refined layer by layer, as `convert` refines it."""
    mergers = []
    for g in groups:  # each G's plan, made once
        plan = attention_plan(reader, arch, shape, MergeOptions(g, RECOMMENDED))
        mergers.append(LayerMerger(reader, arch, plan, g, refinement, hand_on=True))
    held_pass = _HeldOut(arch, shape, groups, held)
    calibration_pass(reader, arch, shape, calibration, [Covariance(shape.hidden), *mergers, held_pass], quiet)
    return held_pass.totals(add_scores)


class _HeldOut:
    """The held-out windows through every layer of the source and of each G's merge (a `Visitor` of the pass,
    after the mergers): one model, each layer's weights read once."""

    label, keeps_windows = "quality per G", False

    def __init__(self, arch: Architecture, shape: ModelShape, groups: list[int], held: dict[str, list[Window]]) -> None:
        self.arch, self.shape, self.groups = arch, shape, groups
        self.batches: list[tuple[str, list[Window]]] = []  # (text, windows of one length)
        for text, windows in held.items():
            by_length: dict[int, list[Window]] = {}
            for w in windows:
                by_length.setdefault(len(w[0]), []).append(w)
            self.batches += [
                (text, group[b : b + HELD_OUT_BATCH])
                for group in by_length.values()
                for b in range(0, len(group), HELD_OUT_BATCH)
            ]
        self.texts = list(held)
        self.windows = [torch.stack([ids for ids, _ in batch]) for _, batch in self.batches]  # each (B, L)
        self.units = len(groups) + 1  # each G's merge, then the source

    def begin(self, source: LayeredSource, first: int) -> None:
        self.source, self.first = source, first
        self.reference = source.hidden[first:]  # the source's hidden states, per batch (B, L, hidden)
        self.paths = {g: list(self.reference) for g in self.groups}  # each G's

    def window(self, layer: int, seen: SourceAttention) -> None:
        pass

    def layer(self, state: LayerState, done: Callable[[], None]) -> None:
        i = state.index
        for g in self.groups:  # what convert writes: refined, or the closed form where refining did not help
            with _merged(self.source, self.arch, i, g, self.shape.heads, state.converted[g]):
                self.paths[g] = self.source.run_layer(i, self.paths[g], self.first)
            done()
        self.reference = self.source.run_layer(i, self.reference, self.first)
        done()

    def release(self, state: LayerState) -> None:
        pass

    def totals(self, add_scores: Scorer) -> dict[int, dict[str, dict[str, float]]]:
        """Each G's sums against the source per text, from the final hidden states (after the last layer)."""
        keys = ("nll", "ref_nll", "kl", "agree", "count")
        totals = {g: {text: dict.fromkeys(keys, 0.0) for text in self.texts} for g in self.groups}
        self.source.load_head()
        for b, (text, batch) in enumerate(self.batches):
            w = self.first + b
            for row, (ids, first) in enumerate(batch):  # one window at a time: (L, V) log-probs are large
                one = slice(row, row + 1)
                ref = torch.log_softmax(self.source.logits(w, self.reference[b][one], one)[:, :-1].float(), -1)
                target = ids[None, 1:].to(ref.device)  # (1, L-1)
                mask = torch.zeros_like(target, dtype=torch.bool)
                mask[0, first - 1 :] = True  # logits at p-1 predict token p, for p >= first
                for g in self.groups:
                    logp = torch.log_softmax(self.source.logits(w, self.paths[g][b][one], one)[:, :-1].float(), -1)
                    add_scores(totals[g][text], logp, ref, target, mask)
        return totals


class _merged:
    """Layer i with its converted tensors (G-head K/V, refined Q/O) in place of the source's and the attention
    told G, restored on exit."""

    def __init__(
        self, source: LayeredSource, arch: Architecture, i: int, g: int, heads: int, tensors: dict[str, torch.Tensor]
    ) -> None:
        self.source, self.tensors = source, tensors
        self.attention = source.model.get_submodule(arch.attention.format(layer=i))
        self.settings = {"num_key_value_groups": heads // g, "num_key_value_heads": g}
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        model = self.source.model
        for name, value in self.tensors.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            self.saved[name] = getattr(module, attr)
            setattr(module, attr, torch.nn.Parameter(value.to(self.source.device, self.source.dtype), False))
        if not any(hasattr(self.attention, k) for k in self.settings):
            raise UptrainError(f"{type(self.attention).__name__} keeps its KV-head count elsewhere; cannot estimate it")
        for key, value in self.settings.items():
            if hasattr(self.attention, key):
                self.saved[key] = getattr(self.attention, key)
                setattr(self.attention, key, value)

    def __exit__(self, *exc: object) -> None:
        model = self.source.model
        for name, value in self.saved.items():
            if name in self.settings:
                setattr(self.attention, name, value)
            else:
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr, value)
