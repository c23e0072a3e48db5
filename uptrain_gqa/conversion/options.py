"""What one conversion does: `ConvertOptions`, the one object `uptrain convert` and the Python API build and
validate (its fields are the command's options, their docstrings its help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from uptrain_gqa import config as configlib
from uptrain_gqa.conversion.calibrate import DEFAULT_MIX, NONE, Calibration
from uptrain_gqa.conversion.methods import Grouping, Method
from uptrain_gqa.conversion.refine import DEFAULT_LR, Refinement
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.units import parse_size

DtypeOption = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class ConvertOptions:
    """A conversion of SRC into OUT with G key/value heads; see `uptrain convert --help` for the method."""

    src: str = configlib.argument()
    """Local Hugging Face checkpoint folder, or a Hub repo id (org/name) to download."""
    out: str = configlib.argument()
    """Output folder for the converted checkpoint."""
    num_kv_heads: int
    """G, the number of key/value heads to keep; must divide the source's KV-head count and be smaller
    (1 = MQA). `uptrain inspect SRC` lists valid values."""
    method: Method = "mean"
    """How each group's heads become one: mean (average, the paper's default), first (the group's first
    head), random (fresh init with the source weights' std; seeded), svd (least-squares shared heads with
    per-head maps folded exactly into the query and output projections, weighted by the inputs the source
    sees; docs/merging.md). svd is the recommended method (calibrated on uptrain:broad and refined by
    default)."""
    grouping: Grouping = "contiguous"
    """Which source heads share a KV head: contiguous (the ones repeat_kv pairs today) or similarity (similar
    heads together; query and output heads are permuted to match, which changes no output by itself)."""
    calibration: list[str] | None = None
    """What the source reads to weight svd / similarity merges by its layer inputs: one or several texts,
    each [LABEL[:WEIGHT]=]DATA, where DATA is local files (txt/jsonl/parquet or plain-text sources like .md
    .py .c, globs allowed), a Hub dataset id (streamed; see --calibration-subset/--calibration-split) or a
    built-in set (uptrain:broad); WEIGHT is its share (default: equal). Or `random` (uniform random tokens,
    no data) or `none` (weights only: every input direction counts alike; docs/results.md compares it with mean
    pooling). Default: uptrain:broad (random tokens for a source without a tokenizer)."""
    calibration_tokens: int | None = None
    """Tokens to run through the source model, one decoder layer at a time on the GPU if there is one
    (memory: one layer plus these tokens' hidden states). Default: 65,536 of text, 8,192 random. At least the
    model's hidden size; a count whose hidden states memory cannot hold is refused before any work."""
    calibration_subset: str | None = None
    """Configuration (subset) of a Hub --calibration dataset (refused with local files or built-in text)."""
    calibration_split: str = "train"
    """Split of a Hub --calibration dataset (likewise)."""
    calibration_mix: float = DEFAULT_MIX
    """Share of the calibration tokens read from uptrain:broad when --calibration is your own text (0: only
    yours). Keeps the merge and its refinement general; ignored for built-in or random."""
    refine_steps: int | None = None
    """Layer-wise refinement: after each layer's merge, Adam steps (one calibration window each) that fit the
    converted attention's output to the source's on the calibration text, changing only values (a standard
    GQA checkpoint still). A layer keeps them only if they lower its error on held-out windows. Default: 36
    when the source reads text (uptrain:broad by default), 0 (closed form only) with random tokens or none;
    0 turns it off. Each layer's steps run inside the calibration pass (docs/results.md says what it costs)."""
    refine_lr: float = DEFAULT_LR
    """Peak learning rate of the refinement (cosine decay to 0); 0 < lr <= 1."""
    dtype: DtypeOption = "auto"
    """Cast floating-point tensors on the way (auto keeps each tensor's dtype)."""
    max_shard_size: str = "5GB"
    """Largest output shard, e.g. 5GB, 500MB, 2GiB."""
    overwrite: bool = False
    """Replace OUT if it exists (only once the new checkpoint is complete)."""
    seed: int = 0
    """Seed for --method random (and the calibration's sampling)."""
    revision: str | None = None
    """Hub branch, tag or commit (Hub repo ids only)."""
    allow_pickle: bool = False
    """Accept pytorch_model*.bin checkpoints (unpickling can run code; loaded with weights_only=True).
    Refused by default."""
    base_model: str | None = None
    """The Hub id the model card names as base_model (default: the source's Hub id, or the 'org/name' its
    config.json was saved with; left out when neither is known)."""

    def __post_init__(self) -> None:
        configlib.accept_paths_and_single_items(self, paths=("src", "out"), lists=("calibration",))
        configlib.check_types(self)
        self.shard_bytes  # noqa: B018  # refused now, not after the calibration pass
        # numbers that cannot work, refused before the source is looked at (a Hub source is not downloaded first)
        Refinement(0 if self.refine_steps is None else self.refine_steps, self.refine_lr)
        _ = Calibration(tokens=self.calibration_tokens, mix=self.calibration_mix).num_tokens
        if not self.calibration or self.calibration == [NONE]:  # no Hub dataset; the ones given: Calibration.check
            for flag, value, default in (("--calibration-subset", self.calibration_subset, None),
                                         ("--calibration-split", self.calibration_split, "train")):  # fmt: skip
                if value != default:
                    raise UptrainError(
                        f"{flag} applies to a Hub --calibration dataset only, and none is given: drop it"
                    )

    @property
    def out_path(self) -> Path:
        return Path(self.out).absolute()

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype to cast to; None keeps each tensor's."""
        return None if self.dtype == "auto" else getattr(torch, self.dtype)
