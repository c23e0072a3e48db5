"""The source checks `uptrain convert` and `uptrain plan --quality` share: one pre-flight for both.

A source one refuses, the other refuses too, with the same line.

`CheckedSource.open` reads the config alone (a Hub id: config and tokenizer files only, nothing large
downloaded): the family is one uptrain knows (`lookup`) and the shape readable. Then, before any weight is
read, `tokenizer` loads the tokenizer when text is to be read (one line when there is none). `weights`
fetches the weights and hands them out through `FiniteReader` (NaN/inf in an attention tensor stops, elsewhere
a warning), and `attention_plan` checks every attention tensor's header against the config (shapes, layer
count, missing tensors) for each G, before any value is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uptrain_gqa.conversion.checks import FiniteReader, TensorChecks
from uptrain_gqa.conversion.layouts import layer_steps
from uptrain_gqa.conversion.methods import RECOMMENDED
from uptrain_gqa.conversion.steps import LayerSteps, MergeOptions
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import read_config
from uptrain_gqa.io.hub import Source, fetch_weights, resolve_source
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import Architecture, lookup
from uptrain_gqa.model.shape import ModelShape, shape_of_config_json
from uptrain_gqa.progress import LOGGER


def attention_plan(reader: Any, arch: Architecture, shape: ModelShape, options: MergeOptions) -> dict[int, LayerSteps]:
    """Per layer, the steps that replace its attention tensors for `options.num_kv_heads` heads, from the headers
    alone; raises UptrainError when G is out of reach or the weights disagree with the config (a tensor's shape, a
    missing tensor, layers beyond the config's count)."""
    shape.check_target(options.num_kv_heads)
    checks = TensorChecks(reader.tensors, shape)
    checks.no_extra_layers(arch.attention)
    return {layer: layer_steps(layer, checks, arch, shape, options) for layer in range(shape.layers)}


def source_tokenizer(path: Path, flag: str, instead: str) -> Any:
    """The tokenizer of the checkpoint at `path`, to read `flag`'s text with; one line saying `instead` when it
    has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UptrainError(
            f"{flag} text needs the source's tokenizer, and {path} has none that loads ({reason}); {instead}"
        ) from e


@dataclass
class CheckedSource:
    """A source checkpoint, read as `convert` reads it: its config checked, then its tokenizer and weights."""

    source: Source
    config: dict[str, Any]
    arch: Architecture
    shape: ModelShape

    @classmethod
    def open(cls, src: str, revision: str | None = None) -> CheckedSource:
        """SRC (a folder or Hub id) from its config alone: a family uptrain converts, a shape it can read."""
        source = resolve_source(src, revision)
        config = read_config(source.path)
        arch = lookup(config)
        return cls(source, config, arch, shape_of_config_json(config, arch.kv_heads_field))

    @property
    def path(self) -> Path:
        return self.source.path

    def is_attention(self, name: str) -> bool:
        """A tensor of an attention projection: NaN/inf there would spread into every head of its group."""
        a = self.arch
        return any(f".{p}." in name for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.qkv_proj) if p)

    def tokenizer(self, flag: str, instead: str) -> Any:
        """The source's tokenizer, to read `flag`'s text with; one line saying `instead` when it has none that
        loads."""
        return source_tokenizer(self.path, flag, instead)

    def weights(self, allow_pickle: bool = False, passing: str = "copied unchanged") -> FiniteReader:
        """The weights (a Hub id's fetched now, pinned to the config's commit), every value checked as it is read:
        NaN/inf in an attention tensor refused, elsewhere a warning saying what is done with it (`passing`). Call
        `close()` on the reader when done."""
        self.source = fetch_weights(self.source, allow_pickle)
        reader = CheckpointReader(self.source.path, allow_pickle=allow_pickle)
        return FiniteReader(reader, self.is_attention, LOGGER.warning, passing)

    def check_attention(self, reader: Any, groups: Iterable[int]) -> None:
        """Every attention tensor's header against the config, as `convert` checks it for each of `groups`."""
        for g in groups:
            attention_plan(reader, self.arch, self.shape, MergeOptions(g, RECOMMENDED))
