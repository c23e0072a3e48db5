"""Where text comes from: the `data` section of a run config (also eval's --data.* and calibration text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from uptrain.config import positive
from uptrain.errors import UptrainError


@dataclass
class DataConfig:
    dataset: str | None = None
    """A Hugging Face Hub dataset, e.g. HuggingFaceFW/fineweb-edu."""
    name: str | None = None
    """The Hub dataset's configuration (subset), e.g. sample-10BT."""
    split: str = "train"
    """Split of the Hub dataset to train on."""
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
    seq_len: int = 2048
    """Tokens per training sequence: documents are packed into blocks of this length with EOS between them."""
    streaming: bool = False
    """Stream the data instead of downloading and tokenizing it up front (very large corpora)."""
    shuffle_buffer: int = 10_000
    """Streaming only: documents in the shuffle buffer."""
    num_proc: int | None = None
    """Processes for tokenization; default: the CPU count (at most 16)."""
    cache_dir: str | None = None
    """Cache for downloads and tokenized blocks; default: the datasets cache (HF_DATASETS_CACHE)."""

    def __post_init__(self) -> None:
        if bool(self.dataset) == bool(self.files):
            raise UptrainError("data needs exactly one of data.dataset (a Hub dataset) or data.files (local files)")
        if self.seq_len < 2:
            raise UptrainError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if self.validation_blocks < 1:
            raise UptrainError(f"data.validation_blocks must be at least 1, got {self.validation_blocks}")
        positive("data", shuffle_buffer=self.shuffle_buffer, num_proc=self.num_proc)
