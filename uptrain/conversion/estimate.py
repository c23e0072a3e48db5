"""What each G costs in quality before any checkpoint is written (`uptrain plan --quality`).

One calibration pass measures Σ of every layer's attention input (as `convert --calibration` does).
Then the held-out windows run through the source one decoder layer at a time (`LayeredSource`), and
beside them, for every G, through the same layer with its K/V merged as `convert --method svd` merges
them (the merge computed in memory from Σ; nothing written). Memory holds one layer's weights, its G
merges, and the hidden states of the held-out tokens once per G and once for the source. At the end
each path's logits are scored against the source's on the same positions: the KL and top-1 agreement
that `uptrain eval --reference SOURCE` reports on the converted checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uptrain.conversion.calibrate import Calibration, input_covariance
from uptrain.conversion.convert import conversion_steps
from uptrain.conversion.layered import LayeredSource
from uptrain.conversion.refine import LayerRefiner, RefinedStore, Refinement
from uptrain.conversion.steps import MergeOptions, Step
from uptrain.device import compute_device, inference_dtype
from uptrain.errors import UptrainError
from uptrain.io.reader import CheckpointReader
from uptrain.model.families import Architecture
from uptrain.model.shape import ModelShape

Window = tuple[torch.Tensor, int]  # (token ids (L,), first position scored in it)
Scorer = Callable[[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Adds one window's sums to totals: (totals, log-probs of the model, of the reference, targets, scored mask)."""


@torch.no_grad()
def merge_quality(
    reader: CheckpointReader,
    arch: Architecture,
    shape: ModelShape,
    groups: list[int],
    calibration: Calibration,
    held: list[Window],
    add_scores: Scorer,
    folder: Path,
    refinement: Refinement | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict[int, dict[str, float]]:
    """{G: the scorer's totals of the source (reference) against its G-head merge} over the `held` windows.
    With `refinement`, each G's merge is refined layer by layer during the calibration pass, as `convert`
    refines it. `folder` holds the Σ files (and refined tensors) while this runs."""
    from tqdm.auto import tqdm

    device = compute_device()
    dtype = inference_dtype(device)
    options = {g: MergeOptions(g, "svd", "contiguous", seed) for g in groups}
    refiners = {}
    if refinement is not None:
        refiners = {
            g: LayerRefiner(refinement, reader, arch, shape, options[g], RefinedStore(folder / f"refined-g{g}"))
            for g in groups
        }
    sigma = input_covariance(reader, arch, shape, calibration, folder / "sigma", quiet, None, list(refiners.values()))
    merges = {}
    for g in groups:
        steps = conversion_steps(reader, arch, shape, dataclasses.replace(options[g], sigma=sigma))
        if g in refiners:  # refined layers (where refining lowered the held-out error) replace the closed form
            steps = steps.made_by({name: refiners[g].store.job(name) for name in refiners[g].store})
        merges[g] = _layer_steps(steps.steps)
    source = LayeredSource(reader, arch, shape, [ids[None].to(device) for ids, _ in held], device, dtype, "--quality")
    paths: dict[int, list[torch.Tensor]] = {g: list(source.hidden) for g in groups}
    reference = source.hidden
    with tqdm(total=shape.layers * (len(groups) + 1), desc="quality per G", unit="layer", disable=quiet,
              file=sys.stderr) as bar:  # fmt: skip
        for i in range(shape.layers):
            names = source.load_layer(i)
            for g in groups:
                with _merged(source, arch, i, g, shape.heads, merges[g].get(i, [])):
                    paths[g] = source.run_layer(i, paths[g])
                bar.update()
            reference = source.run_layer(i, reference)
            bar.update()
            source.unload(names)
    totals = {g: dict.fromkeys(("nll", "ref_nll", "kl", "agree", "count"), 0.0) for g in groups}
    source.load_head()
    for w, (ids, first) in enumerate(held):
        ref = torch.log_softmax(source.logits(w, reference[w])[:, :-1].float(), -1)  # (1, L-1, V)
        target = ids[None, 1:].to(ref.device)
        mask = torch.zeros_like(target, dtype=torch.bool)
        mask[0, first - 1 :] = True  # logits at p-1 predict token p, for p >= first
        for g in groups:
            logp = torch.log_softmax(source.logits(w, paths[g][w])[:, :-1].float(), -1)
            add_scores(totals[g], logp, ref, target, mask)
    return totals


def _layer_steps(steps: list[Step]) -> dict[int, list[Step]]:
    """The computed (merged) tensors of each layer, by layer index."""
    out: dict[int, list[Step]] = {}
    for step in steps:
        if not step.copied:
            layer = next((int(p) for p in step.spec.name.split(".") if p.isdigit()), None)
            if layer is None:
                raise UptrainError(f"merged tensor {step.spec.name} belongs to no layer; cannot estimate this model")
            out.setdefault(layer, []).append(step)
    return out


class _merged:
    """Layer i with its K/V tensors replaced by the G-head merge (and the attention told G), restored on exit."""

    def __init__(
        self, source: LayeredSource, arch: Architecture, i: int, g: int, heads: int, steps: list[Step]
    ) -> None:
        self.source, self.steps = source, steps
        self.attention = source.model.get_submodule(arch.attention.format(layer=i))
        self.settings = {"num_key_value_groups": heads // g, "num_key_value_heads": g}
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        model = self.source.model
        for step in self.steps:
            module_name, _, attr = step.spec.name.rpartition(".")
            module = model.get_submodule(module_name)
            value = torch.cat(list(step.chunks(self.source.reader))).reshape(step.spec.shape)
            self.saved[step.spec.name] = getattr(module, attr)
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
