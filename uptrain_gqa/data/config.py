"""Where text comes from: the `data` section of a run config (also eval's --data.* and calibration text)."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from uptrain_gqa.config import positive
from uptrain_gqa.errors import UptrainError


@dataclass
class MixtureSource:
    """One source of a data mixture: a Hub dataset or local files, and its share of the training blocks."""

    label: str
    """Short name of the source, used in metrics (val_loss/LABEL)."""
    weight: float
    """Share of the training blocks drawn from this source (weights are normalised to sum to 1)."""
    dataset: str | None = None
    """A Hugging Face Hub dataset, e.g. HuggingFaceFW/fineweb-edu."""
    name: str | None = None
    """The Hub dataset's configuration (subset)."""
    split: str = "train"
    """Split of the Hub dataset."""
    revision: str | None = None
    """Hub dataset revision (a commit pins the data)."""
    files: list[str] = field(default_factory=list)
    """Local files instead of a Hub dataset; globs allowed."""
    text_column: str = "text"
    """Column holding the documents' text."""
    validation_split: str | None = None
    """A Hub split held out for validation (not the training split); default: the first data.validation_blocks
    blocks of this source (streamed: documents held out by a hash of their text)."""
    validation_files: list[str] = field(default_factory=list)
    """Local files held out for validation, never trained on (by any source, even where its files name them);
    default: the first data.validation_blocks blocks of this source (streamed: documents held out by a hash of
    their text)."""

    def __post_init__(self) -> None:
        where = f"data.mixture[{self.label}]"
        if not re.fullmatch(r"[\w.-]+", self.label):
            raise UptrainError(f"{where}.label must be a short name (letters, digits, _ . -), got {self.label!r}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise UptrainError(f"{where}.weight must be a positive number, got {self.weight}")
        if bool(self.dataset) == bool(self.files):
            raise UptrainError(f"{where} needs exactly one of dataset (a Hub dataset) or files (local files)")


@dataclass
class DataConfig:
    dataset: str | None = None
    """A Hugging Face Hub dataset, e.g. HuggingFaceFW/fineweb-edu."""
    name: str | None = None
    """The Hub dataset's configuration (subset), e.g. sample-10BT."""
    split: str = "train"
    """Split of the Hub dataset to train on."""
    revision: str | None = None
    """Hub dataset revision (a commit hash pins the data exactly)."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Several weighted sources instead of dataset/files, e.g. [{label: web, weight: 0.7, dataset: ...},
    {label: code, weight: 0.3, files: [...]}]; blocks are interleaved reproducibly by weight, and the
    validation loss is reported per source. With data.streaming each source is streamed."""
    files: list[str] = field(default_factory=list)
    """Local data instead of a Hub dataset: .txt, .jsonl/.json or .parquet files; globs allowed."""
    text_column: str = "text"
    """Column holding the documents' text (jsonl, parquet, Hub datasets)."""
    txt_documents: Literal["file", "paragraph", "line"] = "file"
    """How .txt files split into documents."""
    validation_split: str | None = None
    """A Hub split held out for validation, e.g. 'validation' (not the training split); default: the first
    `validation_blocks` blocks."""
    validation_files: list[str] = field(default_factory=list)
    """Local files held out for validation, never trained on (even where data.files names them too); default:
    the first `validation_blocks` blocks."""
    validation_blocks: int = 128
    """Blocks used for validation. Without a validation split they are the first blocks of the data (or, when
    streaming, blocks of documents held out by a hash of their text), and are never trained on."""
    seq_len: int | None = None
    """Tokens per training sequence: documents are packed into blocks of this length with EOS between them.
    Default: 2048, or the model's max_position_embeddings when that is smaller."""
    streaming: bool = False
    """Stream the data instead of downloading and tokenizing it up front (very large corpora)."""
    shuffle_buffer: int = 10_000
    """Streaming only: documents shuffled together. One source: datasets' shuffle buffer, which a resume
    refills with later documents (bitwise only with 1). A mixture: each source's windows of this many
    documents (at least 256), shuffled by the seed, which resume bitwise."""
    num_proc: int | None = None
    """Processes for tokenization; default: the CPU count (at most 16)."""
    cache_dir: str | None = None
    """Cache for downloads and tokenized blocks; default: the datasets cache (HF_DATASETS_CACHE)."""

    def __post_init__(self) -> None:
        if self.mixture:
            if self.dataset or self.files or self.validation_files or self.validation_split:
                raise UptrainError("data.mixture replaces data.dataset/files/validation_*: give those per source")
            labels = [s.label for s in self.mixture]
            if len(set(labels)) != len(labels):
                raise UptrainError(f"data.mixture labels must differ, got {', '.join(labels)}")
            if not math.isfinite(sum(s.weight for s in self.mixture)):  # each finite, their sum not (1e308 twice)
                raise UptrainError(
                    "data.mixture weights are only relative: their sum must be finite; use e.g. 0.7 and 0.3"
                )
        elif bool(self.dataset) == bool(self.files):
            raise UptrainError(
                "data needs exactly one of data.dataset (a Hub dataset), data.files (local files) or data.mixture"
            )
        if self.seq_len is not None and self.seq_len < 2:
            raise UptrainError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if self.validation_blocks < 1:
            raise UptrainError(f"data.validation_blocks must be at least 1, got {self.validation_blocks}")
        positive("data", shuffle_buffer=self.shuffle_buffer, num_proc=self.num_proc)


DEFAULT_SEQ_LEN = 2048
"""data.seq_len when it is not set and the model allows it."""


def fitted(cfg: DataConfig, max_positions: int | None) -> DataConfig:
    """`cfg` with data.seq_len set: as given, else DEFAULT_SEQ_LEN capped at the model's maximum positions."""
    if cfg.seq_len is not None:
        return cfg
    return dataclasses.replace(cfg, seq_len=min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN))


def mixture_parts(cfg: DataConfig) -> list[tuple[str, float, DataConfig]]:
    """(label, normalised weight, single-source DataConfig) for each source of a mixture."""
    total = sum(src.weight for src in cfg.mixture)
    parts = []
    for src in cfg.mixture:
        single = dataclasses.replace(
            cfg,
            mixture=[],
            dataset=src.dataset,
            name=src.name,
            split=src.split,
            revision=src.revision,
            files=list(src.files),
            text_column=src.text_column,
            validation_split=src.validation_split,
            validation_files=list(src.validation_files),
        )
        parts.append((src.label, src.weight / total, single))
    return parts


def expand_files(patterns: list[str], what: str = "data.files") -> list[str]:
    """Every file the patterns name, sorted; a pattern that matches nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise UptrainError(f"{what}: no file matches '{pattern}'")
        files += matches
    return files


def _found(patterns: list[str]) -> list[str]:
    """The files the patterns name now, sorted, without refusing a pattern that matches nothing (records)."""
    found = {m for p in patterns for m in glob.glob(os.path.expanduser(p), recursive=True) if Path(m).is_file()}
    return sorted(found)


def each_source(cfg: DataConfig) -> list[tuple[str, float, DataConfig, str]]:
    """(label, weight, single-source config, the name of its section) for each source, one for plain data."""
    if not cfg.mixture:
        return [("data", 1.0, cfg, "data")]
    return [(label, weight, single, f"data.mixture[{label}]") for label, weight, single in mixture_parts(cfg)]


def validation_paths(cfg: DataConfig, strict: bool = True) -> dict[str, str]:
    """Every local validation file of the data (each source's, for a mixture), by resolved path: the setting
    that names it. Strict: a pattern that matches nothing is refused (as in training); else skipped."""
    held: dict[str, str] = {}
    for _, _, single, where in each_source(cfg):
        what = f"{where}.validation_files"
        found = expand_files(single.validation_files, what) if strict else _found(single.validation_files)
        for path in found:
            held.setdefault(os.path.realpath(path), what)
    return held


def training_paths(
    cfg: DataConfig, where: str = "data", held: dict[str, str] | None = None, strict: bool = True
) -> tuple[list[str], list[str]]:
    """One source's training files, without those that are validation files (compared by resolved path):
    (the files trained on, the settings naming the validation files left out, one per file). `held`: every
    validation file of the data (`validation_paths`); default: this source's own. Nothing left is refused."""
    held = validation_paths(cfg, strict) if held is None else held
    files = expand_files(cfg.files, f"{where}.files") if strict else _found(cfg.files)
    kept = [f for f in files if os.path.realpath(f) not in held]
    left_out = [held[os.path.realpath(f)] for f in files if os.path.realpath(f) in held]
    if files and not kept and strict:
        raise UptrainError(
            f"{where}.files: every file is also in {', '.join(sorted(set(left_out)))}; nothing is left to train "
            f"on: give {where}.files other files than the validation ones"
        )
    return kept, left_out


def left_out_note(where: str, left_out: list[str]) -> str:
    """The one line that says training files were left out as validation files."""
    files, them = ("1 file is", "it") if len(left_out) == 1 else (f"{len(left_out)} files are", "them")
    return f"{where}.files: {files} also in {', '.join(sorted(set(left_out)))}; trained without {them}"


def _split_parts(split: str) -> list[tuple[str, str]]:
    """A datasets split expression ('train', 'train[:10%]', 'train+test') as (split name, slice) pairs."""
    parts = []
    for part in split.split("+"):
        match = re.fullmatch(r"\s*([^\[\s]+)\s*(\[.*\])?\s*", part)
        name, piece = (match.group(1), match.group(2) or "") if match else (part.strip(), "")
        parts.append((name.lower(), re.sub(r"\s+", "", piece)))
    return parts


def overlapping_splits(train: str, validation: str) -> bool:
    """Whether two Hub split expressions surely share documents: the same split, or a slice of a split
    and the whole of it. Two different slices of one split may well be apart: not refused."""
    for name, piece in _split_parts(train):
        for other, other_piece in _split_parts(validation):
            if name == other and (not piece or not other_piece or piece == other_piece):
                return True
    return False


def check_validation_split(cfg: DataConfig, where: str = "data") -> None:
    """Refuse a Hub validation split that is (part of) the training split: validation would be trained on."""
    if cfg.dataset and not cfg.files and cfg.validation_split and overlapping_splits(cfg.split, cfg.validation_split):
        raise UptrainError(
            f"{where}.validation_split {cfg.validation_split!r} is part of the training split {where}.split "
            f"{cfg.split!r}, so validation would be trained on; give another split (e.g. validation), "
            f"{where}.validation_files, or neither (the first data.validation_blocks blocks are held out)"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _validation(single: DataConfig, where: str, left_out: list[str], blocks: int) -> str:
    """How one source's validation is made, in words."""
    if single.validation_files:
        count = len(_found(single.validation_files))
        out = f"{where}.validation_files ({_plural(count, 'file')}, at most {blocks} blocks), excluded from training"
        return out + (f"; {_plural(len(left_out), 'file')} of {where}.files left out as validation" if left_out else "")
    if single.dataset and single.validation_split:
        return (
            f"Hub split {single.validation_split!r} (at most {blocks} blocks), apart from the training split "
            f"{single.split!r}"
        )
    if single.streaming:
        return (
            f"documents held out by a hash of their text (about {HOLDOUT_PERCENT} %, at most {blocks} blocks), "
            "never trained on"
        )
    return f"the first {blocks} blocks of the data, never trained on"


HOLDOUT_PERCENT = 1
"""Streamed data without validation files or split: documents whose text hashes into this percentage are held out."""


def validation_description(cfg: DataConfig) -> str:
    """How validation is made, in one line, for run records and model cards: each source's (a mixture's
    prefixed by its label)."""
    held = validation_paths(cfg, strict=False)
    said = []
    for label, _, single, where in each_source(cfg):
        left_out = training_paths(single, where, held, strict=False)[1] if not single.dataset else []
        text = _validation(single, where, left_out, cfg.validation_blocks)
        said.append(f"{label}: {text}" if cfg.mixture else text)
    return "; ".join(said)


def data_sources(cfg: DataConfig) -> list[dict[str, object]]:
    """What the data is, for run records: each source's dataset and revision, or the files trained on and their
    bytes; and how its validation is made."""
    held = validation_paths(cfg, strict=False)
    out = []
    for label, weight, single, where in each_source(cfg):
        entry: dict[str, object] = {"label": label, "weight": weight}
        left_out: list[str] = []
        if single.dataset:
            entry |= {
                "dataset": single.dataset,
                "name": single.name,
                "split": single.split,
                "revision": single.revision,
            }
        else:
            files, left_out = training_paths(single, where, held, strict=False)
            entry |= {"files": single.files, "count": len(files), "bytes": sum(os.path.getsize(f) for f in files)}
        entry["validation"] = _validation(single, where, left_out, cfg.validation_blocks)
        out.append(entry)
    return out
