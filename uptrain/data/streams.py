"""Streamed training data: each process reads its own part of a stream, packed on the fly.

A stream is split by process (`split_dataset_by_node`), shuffled with a buffer and packed into
blocks of `seq_len` as it is read; held-out documents are picked by a hash of their text (or come
from a validation split or files), and the stream's position is saved in checkpoints.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from uptrain.data.config import DataConfig
from uptrain.data.documents import load_documents, packer
from uptrain.errors import UptrainError

HOLDOUT_PERCENT = 1  # documents whose text hashes into this percentage are held out


def _held_out(text: str) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HOLDOUT_PERCENT


class StreamData:
    """A stream split by process (`split_dataset_by_node`), shuffled with a buffer, packed on the fly."""

    streaming = True

    def __init__(self, stream: Any, validation: torch.Tensor, micro_batch_size: int) -> None:
        self.stream, self.validation = stream, validation
        self.micro_batch_size = micro_batch_size
        self._iterator: Iterator[dict[str, Any]] | None = None

    def micro_batch(self, micro_index: int) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = iter(self.stream)
        rows = []
        for _ in range(self.micro_batch_size):
            try:
                rows.append(next(self._iterator)["input_ids"])
            except StopIteration:  # next epoch over the stream
                self.stream.set_epoch(getattr(self.stream, "epoch", 0) + 1)
                self._iterator = iter(self.stream)
                rows.append(next(self._iterator)["input_ids"])
        return torch.tensor(np.asarray(rows), dtype=torch.int64)

    def validation_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.validation), batch_size):
            yield self.validation[start : start + batch_size]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._iterator = None


def _stream_blocks(stream: Any, tokenizer: Any, cfg: DataConfig) -> Any:
    stream = stream.select_columns([cfg.text_column])
    return stream.map(
        packer(tokenizer, cfg.text_column, cfg.seq_len), batched=True, batch_size=256, remove_columns=[cfg.text_column]
    )


def prepare_stream(
    cfg: DataConfig, tokenizer: Any, seed: int, micro_batch_size: int, rank: int, world: int
) -> StreamData:
    from datasets.distributed import split_dataset_by_node

    raw = split_dataset_by_node(load_documents(cfg), rank, world)
    held = load_documents(cfg, validation=True)
    column = cfg.text_column
    if held is None:
        held = raw.filter(lambda ex: _held_out(ex[column]))
        raw = raw.filter(lambda ex: not _held_out(ex[column]))
    else:
        held = split_dataset_by_node(held, rank, world)
    want = cfg.validation_blocks // world + (rank < cfg.validation_blocks % world)
    val_rows = [row["input_ids"] for row in itertools.islice(_stream_blocks(held, tokenizer, cfg), want)]
    if not val_rows:
        raise UptrainError("found no held-out validation documents in the stream; set data.validation_split")
    validation = torch.tensor(np.asarray(val_rows), dtype=torch.int64)
    train = _stream_blocks(raw.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer), tokenizer, cfg)
    return StreamData(train, validation, micro_batch_size)
