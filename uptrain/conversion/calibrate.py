"""Calibration for `uptrain convert --calibration`: Σ = E[x̃ x̃ᵀ] of every attention layer's input.

The source reads the calibration text once, one decoder layer at a time, so memory stays bounded
by one layer's weights plus the hidden states of the calibration tokens:

1. the model is built with empty (meta) weights; only the modules before the first layer
   (embeddings, rotary tables) get real weights;
2. a forward over every window records what the model hands each decoder layer (hidden states
   for the first, masks and rotary tables for all) without running any layer;
3. layer by layer: load its weights from the checkpoint, run every window through it while a
   forward pre-hook on its attention module adds xᵀx and Σx of the attention input x (the hidden
   states after the layer's input norm), then drop the weights and write Σ̃ to disk.

Σ̃ is (hidden+1)² float32 per layer; `CovarianceStore` keeps them on disk and loads one per layer
when the merge asks for it.

What the source reads (`Calibration`): local text files (globs), a Hub dataset (streamed: only the
first N tokens are fetched), or `random`: uniform random token ids, which needs no data. Random tokens
are the default for `--method svd` because a Σ that ignores the inputs (the identity, `none`) made
the merge worse than mean pooling on a real checkpoint, while 8,192 random tokens made it 23× better
(SmolLM2-135M, docs/results.md): what matters most is the directions the network's own norms and
embeddings put the inputs in, and any tokens reveal those.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from uptrain.conversion.layered import LayeredSource
from uptrain.conversion.refine import LayerRefiner, Window
from uptrain.data.config import DataConfig
from uptrain.data.documents import expand_files, token_stream
from uptrain.device import compute_device, device_name, inference_dtype
from uptrain.errors import UptrainError
from uptrain.io.reader import CheckpointReader
from uptrain.model.families import Architecture
from uptrain.model.shape import ModelShape


class CovarianceStore(Mapping[int, torch.Tensor]):
    """{layer: Σ̃ (hidden+1, hidden+1)} kept as one safetensors file per layer in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, layer: int) -> Path:
        return self.folder / f"sigma-{layer:05d}.safetensors"

    def put(self, layer: int, sigma: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"sigma": sigma.contiguous()}, str(self._path(layer)))

    def __getitem__(self, layer: int) -> torch.Tensor:
        from safetensors.torch import load_file

        path = self._path(layer)
        if not path.is_file():
            raise KeyError(layer)
        return load_file(str(path))["sigma"]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("sigma-*.safetensors")))

    def __len__(self) -> int:
        return len(list(self.folder.glob("sigma-*.safetensors")))


RANDOM, NONE = "random", "none"
TEXT_TOKENS, RANDOM_TOKENS = 65_536, 8_192  # default token counts (docs/results.md)
_HUB_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")
_FILE_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Calibration:
    """What the source reads to measure Σ: `spec` is local files (globs), a Hub dataset id, or `random`."""

    spec: str
    tokens: int | None = None
    """Tokens to read; None: 65,536 of text, 8,192 random."""
    subset: str | None = None
    """Hub dataset configuration."""
    split: str = "train"
    """Hub dataset split."""
    seed: int = 0
    """Seed of the random tokens."""

    @property
    def kind(self) -> str:
        """'random', 'hub' or 'files'."""
        if self.spec == RANDOM:
            return "random"
        s = self.spec
        looks_local = any(c in s for c in "*?[") or s.lower().endswith(_FILE_SUFFIXES) or Path(s).expanduser().exists()
        return "files" if looks_local or not _HUB_ID.match(s) else "hub"

    @property
    def num_tokens(self) -> int:
        n = self.tokens if self.tokens is not None else RANDOM_TOKENS if self.kind == "random" else TEXT_TOKENS
        if n < 1:
            raise UptrainError(f"--calibration-tokens must be positive, got {n}")
        return n

    def data(self) -> DataConfig:
        if self.kind == "hub":  # streamed: calibration needs the first N tokens, not the whole dataset
            return DataConfig(dataset=self.spec, name=self.subset, split=self.split, streaming=True)
        return DataConfig(files=[self.spec])

    def check(self) -> None:
        """Fail before any work on what can be checked without reading: counts, missing files."""
        _ = self.num_tokens
        if self.kind == "files":
            expand_files([self.spec], "--calibration")
        elif self.kind == "random" and (self.subset or self.split != "train"):
            raise UptrainError("--calibration-subset/--calibration-split apply to a Hub dataset, not to random tokens")

    def stream(self, tokenizer: Any, vocab: int) -> torch.Tensor:
        """The calibration tokens (N,)."""
        if self.kind == "random":
            gen = torch.Generator().manual_seed(self.seed)
            return torch.randint(0, vocab, (self.num_tokens,), generator=gen)
        try:
            stream, _ = token_stream(self.data(), tokenizer, self.num_tokens)
        except UptrainError as e:
            hint = (
                "; Hub datasets need network access: pass local files or `random` offline" if self.kind == "hub" else ""
            )
            raise UptrainError(f"--calibration {self.spec}: {e}{hint}") from e
        return stream

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data": self.spec, "kind": self.kind, "tokens": self.num_tokens}
        if self.kind == "hub":
            out |= {"subset": self.subset, "split": self.split}
        if self.kind == "random":
            out["seed"] = self.seed
        return out


class Alongside(Protocol):
    """More work on each layer while the calibration pass holds it in memory (`plan --quality` runs its
    held-out windows through the source and through each G's merge there, rather than in a second pass)."""

    windows: list[torch.Tensor]
    """Token ids (B, L) the source records beside the calibration windows; not part of Σ."""
    units: int
    """Progress-bar units each layer's `layer` call accounts for."""

    def begin(self, source: LayeredSource, first: int) -> None:
        """Before layer 0: `source` holds `windows` as its windows first, first + 1, ..."""

    def layer(
        self, i: int, sigma: torch.Tensor, converted: list[dict[str, torch.Tensor]], done: Callable[[], None]
    ) -> None:
        """Layer i is loaded and its Σ̃ is `sigma`; `converted` holds each refiner's tensors for it; call `done`
        once per unit of work."""


@torch.no_grad()
def input_covariance(
    reader: CheckpointReader,
    arch: Architecture,
    shape: ModelShape,
    calibration: Calibration,
    folder: Path,
    quiet: bool = False,
    facts: dict[str, Any] | None = None,
    refiners: Sequence[LayerRefiner] = (),
    alongside: Alongside | None = None,
) -> CovarianceStore:
    """Σ̃ = [[E[x xᵀ], E[x]], [E[x]ᵀ, 1]] of each attention layer's input x over the calibration tokens.
    `facts`, when given, receives the tokens used, the device and the seconds taken. With `refiners` (one
    per G: convert has one, `plan --quality` one per G), each layer's converted attention is also refined on the
    windows while the layer is in memory; `alongside` does its own work on each layer after that."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    started = time.perf_counter()
    calibration.check()
    tokens = calibration.num_tokens
    src = reader.folder
    device = compute_device()
    dtype = inference_dtype(device)
    config = AutoConfig.from_pretrained(src)
    if calibration.kind == "random":  # no tokenizer needed: ids straight from the embedding table's range
        stream = calibration.stream(None, int(config.get_text_config().vocab_size))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise UptrainError(
                f"--calibration text needs the source's tokenizer, and {src} has none that loads "
                f"({str(e).splitlines()[0]}); pass --calibration random"
            ) from e
        stream = calibration.stream(tokenizer, 0)
    if calibration.kind != "random" and len(stream) < shape.hidden:  # an empty or near-empty file
        raise UptrainError(
            f"--calibration {calibration.spec} gives {len(stream):,} tokens; a merge weighted by inputs needs at "
            f"least {shape.hidden:,} (this model's hidden size: Σ has one direction per hidden unit) and "
            f"{TEXT_TOKENS:,} are recommended; pass more text"
        )
    if len(stream) < tokens:
        print(f"calibration text has {len(stream):,} tokens, fewer than {tokens:,}; using them all", file=sys.stderr)
    seq = min(2048, getattr(config, "max_position_embeddings", 2048) or 2048)
    windows = [stream[b : b + seq][None].to(device) for b in range(0, len(stream), seq)]
    more = [] if alongside is None else [ids.to(device) for ids in alongside.windows]
    source = LayeredSource(
        reader,
        arch,
        shape,
        windows + more,
        device,
        dtype,
        "--calibration",
        "; pass --calibration none (weights only) or use --method mean",
    )
    hidden = source.hidden[: len(windows)]
    if alongside is not None:
        alongside.begin(source, len(windows))

    # 3. layer by layer: real weights in, every window through, Σ out (and the layer refined)
    store = CovarianceStore(folder)
    acc: list[Any] = []  # the current layer's Σ xᵀx, Σ x, count
    captured: list[Window] = []  # with a refiner: what the source attention saw and returned, per window

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = _attention_call(args, kwargs)[0]
        x = x.reshape(-1, x.shape[-1]).float()  # (B·T, hidden)
        acc[0] = acc[0] + x.T @ x
        acc[1] = acc[1] + x.sum(0)
        acc[2] += x.shape[0]

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x, rest, kw = _attention_call(args, kwargs)
        captured.append(Window(x, rest, kw, out[0] if isinstance(out, tuple) else out))

    units = 1 + (alongside.units if alongside is not None else 0)  # per layer
    what = "calibration" + (" + refinement" if refiners else "") + (" + quality per G" if alongside else "")
    with tqdm(total=shape.layers * units, desc=f"{what} ({len(stream):,} tokens)", unit="layer", disable=quiet,
              file=sys.stderr) as bar:  # fmt: skip
        for i in range(shape.layers):
            names = source.load_layer(i)
            acc[:] = [0.0, 0.0, 0]
            captured.clear()
            attention = source.model.get_submodule(arch.attention.format(layer=i))
            handles = [attention.register_forward_pre_hook(pre, with_kwargs=True)]
            if refiners:
                handles.append(attention.register_forward_hook(capture, with_kwargs=True))
            try:
                hidden[:] = source.run_layer(i, hidden)
            finally:
                for handle in handles:
                    handle.remove()
            xx, xs, n = acc
            if n == 0:
                raise UptrainError(f"layer {i}'s attention never ran during calibration; cannot calibrate this model")
            sigma = torch.ones(shape.hidden + 1, shape.hidden + 1)
            sigma[:-1, :-1] = (xx / n).cpu()
            sigma[:-1, -1] = sigma[-1, :-1] = (xs / n).cpu()
            store.put(i, sigma)
            # fitted on the source's own attention inputs (docs/results.md: better than on the converted
            # layers' outputs, and faster)
            refined = [one.refine(i, sigma, captured) for one in refiners]
            captured.clear()
            bar.update()
            if alongside is not None:
                tensors = [one.tensors(i, m) for one, m in zip(refiners, refined, strict=True)]
                alongside.layer(i, sigma, tensors, bar.update)
            for one, module in zip(refiners, refined, strict=True):
                one.release(module)
            source.unload(names)
    if facts is not None:
        facts |= {"tokens_used": len(stream), "device": device_name(device),
                  "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    return store


def _attention_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, the other positional arguments, the keyword arguments) of an attention call."""
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs)
        return kwargs.pop("hidden_states"), args, kwargs
    return args[0], args[1:], kwargs
