"""What each G costs in quality before any checkpoint is written (`uptrain plan --quality`).

One pass over the source, one decoder layer at a time (`LayeredSource`): while a layer is loaded,
the calibration windows give its Σ (and refine each G's merge, as `convert --calibration` does), and
then the held-out windows run through it twice over: as the source has it, and for every G with its
K/V merged as `convert --method svd` merges them (the merge computed in memory; nothing written).
Memory holds one layer's weights, its G merges, the calibration hidden states, and the held-out
hidden states once per G and once for the source. At the end each path's logits are scored against
the source's on the same positions: the KL and top-1 agreement that `uptrain eval --reference SOURCE`
reports on the converted checkpoint.

Before any of it, `check_held_out_tokens` refuses a held-out count whose hidden states would not fit in memory,
and the Σ files and refined tensors live in a folder of the run's own (`scratch_folder`), locked while it runs:
a run killed outright (the OOM killer) leaves it behind, and the next run removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.conversion.calibrate import Calibration, input_covariance
from uptrain_gqa.conversion.checks import TensorChecks
from uptrain_gqa.conversion.layered import LayeredSource
from uptrain_gqa.conversion.refine import LayerRefiner, RefinedStore, Refinement, closed_form
from uptrain_gqa.conversion.steps import MergeOptions
from uptrain_gqa.device import available_memory, compute_device, device_name, inference_dtype
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.ownership import OutputLock, lock_path
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import Architecture
from uptrain_gqa.model.shape import ModelShape
from uptrain_gqa.progress import LOGGER
from uptrain_gqa.units import format_bytes

Window = tuple[torch.Tensor, int]  # (token ids (L,), first position scored in it)
Scorer = Callable[[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Adds one batch's sums to totals: (totals, log-probs of the model, of the reference, targets, scored mask)."""
SCRATCH = "uptrain-quality-"
"""Name of the folders (in $TMPDIR) that hold a run's Σ files; `.NAME.uptrain.lock` beside each holds its PID."""


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


@contextlib.contextmanager
def scratch_folder(root: Path | None = None) -> Iterator[Path]:
    """A folder of this run's own in `root` (default: $TMPDIR) for the Σ files and refined tensors, locked
    (`OutputLock`, holding the PID) while the run lasts and removed at its end. Folders of runs that were killed
    (their lock free, since the kernel released it) are removed first, each said in one line."""
    root = Path(root if root is not None else tempfile.gettempdir())
    remove_dead_scratch(root)
    folder = root / f"{SCRATCH}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock = OutputLock(folder).acquire()  # before the folder exists: a folder of ours is never without its lock
    try:
        folder.mkdir(mode=0o700)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()


def remove_dead_scratch(root: Path) -> None:
    """Remove the folders that `plan --quality` runs killed outright left in `root` (a folder whose lock no live
    process holds), saying so; a folder without a lock (an older uptrain's) is named, not removed."""
    for folder in sorted(root.glob(f"{SCRATCH}*")):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue  # another user's, or not one of ours
        except OSError:
            continue
        if not lock_path(folder).exists():
            LOGGER.warning(
                f"{folder} may hold Σ files of an interrupted `uptrain plan --quality`; delete it once no plan runs"
            )
            continue
        lock = OutputLock(folder)
        try:
            lock.acquire()
        except UptrainError:
            continue  # a live run's (or a lock we cannot take): left alone
        try:
            if folder.is_dir():  # not finished and removed meanwhile by its own run
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(folder, ignore_errors=True)
                if folder.exists():
                    LOGGER.warning(f"{folder}, left by a killed `uptrain plan --quality`, could not be removed")
                else:
                    LOGGER.warning(
                        f"removed {folder} ({format_bytes(size)}), left by a killed `uptrain plan --quality`"
                    )
        finally:
            lock.release()


@torch.no_grad()
def merge_quality(
    reader: CheckpointReader,
    arch: Architecture,
    shape: ModelShape,
    groups: list[int],
    calibration: Calibration,
    held: dict[str, list[Window]],
    add_scores: Scorer,
    folder: Path,
    refinement: Refinement | None = None,
    seed: int = 0,
    quiet: bool = False,
    batch_size: int = 4,
) -> dict[int, dict[str, dict[str, float]]]:
    """{G: {text: the scorer's totals of the source (reference) against its G-head merge}} over each held-out
    text's windows (run `batch_size` at a time). With `refinement`, each G's merge is refined layer by layer, as
    `convert` refines it. `folder` holds the Σ files (and refined tensors) while this runs."""
    options = {g: MergeOptions(g, "svd", "contiguous", seed) for g in groups}
    refiners = {}
    if refinement is not None:
        refiners = {
            g: LayerRefiner(refinement, reader, arch, shape, options[g], RefinedStore(folder / f"refined-g{g}"))
            for g in groups
        }
    held_pass = _HeldOut(reader, arch, shape, options, list(refiners), held, batch_size)
    refining = list(refiners.values())
    input_covariance(reader, arch, shape, calibration, folder / "sigma", quiet, None, refining, held_pass)
    return held_pass.totals(add_scores)


class _HeldOut:
    """The held-out windows through every layer of the source and of each G's merge, done while the
    calibration pass holds the layer (`calibrate.Alongside`): one model, each layer's weights read once."""

    def __init__(
        self,
        reader: CheckpointReader,
        arch: Architecture,
        shape: ModelShape,
        options: dict[int, MergeOptions],
        refined: list[int],
        held: dict[str, list[Window]],
        batch_size: int,
    ) -> None:
        self.reader, self.arch, self.shape, self.options, self.refined = reader, arch, shape, options, refined
        self.checks = TensorChecks(reader.tensors, shape)
        self.batches: list[tuple[str, list[Window]]] = []  # (text, windows of one length)
        for text, windows in held.items():
            by_length: dict[int, list[Window]] = {}
            for w in windows:
                by_length.setdefault(len(w[0]), []).append(w)
            self.batches += [
                (text, group[b : b + batch_size])
                for group in by_length.values()
                for b in range(0, len(group), batch_size)
            ]
        self.texts = list(held)
        self.windows = [torch.stack([ids for ids, _ in batch]) for _, batch in self.batches]  # each (B, L)
        self.units = len(options) + 1  # each G's merge, then the source

    def begin(self, source: LayeredSource, first: int) -> None:
        self.source, self.first = source, first
        self.reference = source.hidden[first:]  # the source's hidden states, per batch (B, L, hidden)
        self.paths = {g: list(self.reference) for g in self.options}  # each G's

    def layer(
        self, i: int, sigma: torch.Tensor, converted: list[dict[str, torch.Tensor]], done: Callable[[], None]
    ) -> None:
        for g, options in self.options.items():
            if g in self.refined:  # what convert writes: refined, or the closed form where refining did not help
                tensors = converted[self.refined.index(g)]
            else:
                tensors, _ = closed_form(self.reader, self.checks, self.arch, self.shape, options, i, sigma)
            with _merged(self.source, self.arch, i, g, self.shape.heads, tensors):
                self.paths[g] = self.source.run_layer(i, self.paths[g], self.first)
            done()
        self.reference = self.source.run_layer(i, self.reference, self.first)
        done()

    def totals(self, add_scores: Scorer) -> dict[int, dict[str, dict[str, float]]]:
        """Each G's sums against the source per text, from the final hidden states (after the last layer)."""
        keys = ("nll", "ref_nll", "kl", "agree", "count")
        totals = {g: {text: dict.fromkeys(keys, 0.0) for text in self.texts} for g in self.options}
        self.source.load_head()
        for b, (text, batch) in enumerate(self.batches):
            w = self.first + b
            for row, (ids, first) in enumerate(batch):  # one window at a time: (L, V) log-probs are large
                one = slice(row, row + 1)
                ref = torch.log_softmax(self.source.logits(w, self.reference[b][one], one)[:, :-1].float(), -1)
                target = ids[None, 1:].to(ref.device)  # (1, L-1)
                mask = torch.zeros_like(target, dtype=torch.bool)
                mask[0, first - 1 :] = True  # logits at p-1 predict token p, for p >= first
                for g in self.options:
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
