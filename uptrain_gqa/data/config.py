"""Where text comes from: the `data` section of a run config (also eval's --data.* and calibration text)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
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
    """A Hub split held out for validation; default: the first data.validation_blocks blocks of this source
    (streamed: documents held out by a hash of their text)."""
    validation_files: list[str] = field(default_factory=list)
    """Local files held out for validation; default: the first data.validation_blocks blocks of this source
    (streamed: documents held out by a hash of their text)."""

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
    """A Hub split held out for validation, e.g. 'validation'; default: the first `validation_blocks` blocks."""
    validation_files: list[str] = field(default_factory=list)
    """Local files held out for validation; default: the first `validation_blocks` blocks."""
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


def data_sources(cfg: DataConfig) -> list[dict[str, object]]:
    """What the data is, for run records: each source's dataset and revision, or its files and their bytes."""
    import glob
    import os

    out = []
    for label, weight, single in mixture_parts(cfg) if cfg.mixture else [("data", 1.0, cfg)]:
        entry: dict[str, object] = {"label": label, "weight": weight}
        if single.dataset:
            entry |= {
                "dataset": single.dataset,
                "name": single.name,
                "split": single.split,
                "revision": single.revision,
            }
        else:
            files = sorted({f for p in single.files for f in glob.glob(os.path.expanduser(p), recursive=True)})
            entry |= {"files": single.files, "count": len(files), "bytes": sum(os.path.getsize(f) for f in files)}
        out.append(entry)
    return out
