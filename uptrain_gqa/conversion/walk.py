"""The one pass over the source, layer by layer, with equal visitors: Σ, each G's merge, held-out scores.

One decoder layer at a time (conversion/layered.py), every calibration window through it, and each `Visitor`
handed what the layer's attention saw, then the layer, in order.

The visitors are equal: `calibrate.Covariance` leaves the layer's Σ̃, a `layer_merge.LayerMerger` per G merges
(and refines) the layer with it, and `plan --quality`'s held-out scoring (estimate.py) runs its own windows
through the source and each G's merge. Memory holds one layer's weights, the hidden states of the calibration
tokens, and what the visitors hold for the layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from uptrain_gqa.conversion.calibrate import Calibration
from uptrain_gqa.conversion.layered import LayeredSource, LayerState, SourceAttention, Visitor, attention_call
from uptrain_gqa.device import compute_device, device_name, inference_dtype
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import Architecture
from uptrain_gqa.model.shape import ModelShape
from uptrain_gqa.progress import progress_bar


@torch.no_grad()
def calibration_pass(
    reader: CheckpointReader,
    arch: Architecture,
    shape: ModelShape,
    calibration: Calibration,
    visitors: Sequence[Visitor],
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the calibration windows through the source layer by layer, with `visitors`; returns the facts of the
    pass: tokens used (in all and per text), the device and the seconds taken."""
    started = time.perf_counter()
    beside = sum(int(w.numel()) for v in visitors for w in v.windows)
    refining = any(v.keeps_windows for v in visitors)
    calibration.check(shape, refining=refining, beside=beside)  # before anything is allocated
    device = compute_device()
    labelled = calibration.read(reader.folder, shape, quiet)
    used = sum(len(ids) for _, ids in labelled)
    windows = [ids[None].to(device) for _, ids in labelled]
    seen_as = list(
        zip(calibration.may_hold_out([label for label, _ in labelled]), [lb for lb, _ in labelled], strict=True)
    )
    more = [ids.to(device) for v in visitors for ids in v.windows]
    hint = "; pass --calibration none (weights only) or use --method mean"
    source = LayeredSource(reader, arch, shape, windows + more, device, inference_dtype(device), "--calibration", hint)
    first = len(windows)
    for v in visitors:
        v.begin(source, first)
        first += len(v.windows)
    hidden = source.hidden[: len(windows)]
    what = " + ".join(dict.fromkeys(v.label for v in visitors if v.label))
    units = sum(v.units for v in visitors)
    with progress_bar(total=shape.layers * units, desc=f"{what} ({used:,} tokens)", unit="layer", disable=quiet) as bar:
        for i in range(shape.layers):
            _walk_layer(source, i, hidden, visitors, seen_as, bar.update)
    by_text: dict[str, int] = {}
    for label, ids in labelled:
        by_text[label] = by_text.get(label, 0) + len(ids)
    return {"tokens_used": used, "tokens_by_text": by_text, "device": device_name(device),
            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip


def _walk_layer(
    source: LayeredSource,
    i: int,
    hidden: list[torch.Tensor],
    visitors: Sequence[Visitor],
    seen_as: list[tuple[bool, str]],
    done: Callable[[], None],
) -> None:
    """Layer i: its weights in, every calibration window through it (each visitor shown what its attention saw;
    `hidden` becomes the states leaving it), each visitor's work on it, its weights out."""
    names = source.load_layer(i)
    attention = source.model.get_submodule(source.arch.attention.format(layer=i))
    order = iter(seen_as)  # (may be held out, text) of each calibration window, in the order they run

    def seen(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x, rest, kw = attention_call(args, kwargs)
        may_hold_out, label = next(order)
        window = SourceAttention(x, rest, kw, out[0] if isinstance(out, tuple) else out, may_hold_out, label)
        for v in visitors:
            v.window(i, window)

    handle = attention.register_forward_hook(seen, with_kwargs=True)
    try:
        hidden[:] = source.run_layer(i, hidden)
    finally:
        handle.remove()
    state = LayerState(i)
    for v in visitors:
        v.layer(state, done)
    for v in visitors:
        v.release(state)
    source.unload(names)
