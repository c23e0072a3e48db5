"""Training data: documents -> tokens -> fixed-length blocks, and which blocks each process reads.

Documents (`uptrain_gqa.data.documents`) are tokenized, an EOS is put
after each, and the token stream is cut into blocks of `seq_len`. With `datasets` this runs
in several processes and is cached (keyed by the data, the tokenizer and `seq_len`); one
process prepares while the others wait, then every process opens the same memory-mapped
blocks.

Order: the blocks form one global sequence — a seeded permutation per epoch — that does not
depend on the number of processes. Global micro-batch i is positions [i·P·b, (i+1)·P·b) of it
(P processes, b sequences each), and process r reads only its own slice of b. So an optimizer
step sees the same blocks whether it runs on 1 process or 8, and the position in the data is a
function of the step: resuming needs no data state.

Streamed data (`data.streaming`) is read in `uptrain_gqa.data.streams`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uptrain_gqa.data.config import (
    DataConfig,
    check_validation_split,
    each_source,
    left_out_note,
    mixture_parts,
    training_paths,
    validation_paths,
)
from uptrain_gqa.data.documents import load_documents, packer, require_column
from uptrain_gqa.data.forked import run_in_child
from uptrain_gqa.data.streams import StreamData, StreamMixture, prepare_stream, prepare_stream_mixture
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.progress import LOGGER


def _token_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_dataset(ds: Any, tokenizer: Any, cfg: DataConfig) -> Any:
    """A map-style Dataset of documents -> a Dataset of int32 blocks (cached, multi-process)."""
    from datasets import Features, Sequence, Value

    require_column(ds, cfg.text_column)
    procs = cfg.num_proc or min(16, os.cpu_count() or 1)
    procs = max(1, min(procs, len(ds) // 1000))  # forking costs more than it saves on small data
    if procs > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    key = f"{ds._fingerprint}-{_token_fingerprint(tokenizer)}-{cfg.text_column}-{cfg.seq_len}-uptrain1"

    def tokenize() -> Any:
        return ds.map(
            packer(tokenizer, cfg.text_column, cfg.seq_len),
            batched=True,
            batch_size=1000,
            remove_columns=ds.column_names,
            num_proc=procs if procs > 1 else None,
            features=Features({"input_ids": Sequence(Value("int32"), length=cfg.seq_len)}),
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
            desc="tokenizing and packing",
        )

    if procs > 1 and ds.cache_files:  # the pool runs apart, so that a signal stops it cleanly
        run_in_child(tokenize, sorted({Path(f["filename"]).parent for f in ds.cache_files}), "tokenizing")
    blocks = tokenize()  # multi-process: loads what the child cached
    if len(blocks) == 0:
        raise UptrainError(f"the data holds fewer than {cfg.seq_len} tokens: not one block of data.seq_len")
    return blocks.with_format("numpy")


class BlockOrder:
    """Global block order: epoch e is a permutation of the training blocks seeded by (seed, e)."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks, self.seed = num_blocks, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block ids at global positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        for i, pos in enumerate(range(start, start + count)):
            epoch, offset = divmod(pos, self.num_blocks)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            out[i] = self._perm[offset]
        return out


class BlockData:
    """Packed blocks on disk; each process reads only the blocks of its own slice. For a mixture the
    validation blocks are the sources' one after another, `parts` naming each source's range."""

    streaming = False

    def __init__(
        self,
        train: Any,
        validation: Any,
        seed: int,
        micro_batch_size: int,
        rank: int,
        world: int,
        parts: list[tuple[str, range]] | None = None,
    ) -> None:
        self.train, self.validation = train, validation
        self.order = BlockOrder(len(train), seed)
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.parts = parts or []

    def ids(self, micro_index: int) -> np.ndarray:
        b = self.micro_batch_size
        return self.order.blocks(micro_index * self.world * b + self.rank * b, b)

    def micro_batch(self, micro_index: int) -> torch.Tensor:
        """This process's sequences of global micro-batch `micro_index`: (b, seq_len) int64."""
        return torch.from_numpy(self.train[self.ids(micro_index)]["input_ids"].astype(np.int64))

    def validation_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """This process's share of the validation blocks."""
        for _, ids in self.validation_rows(batch_size):
            yield ids

    def validation_rows(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """This process's share of the validation blocks, with their row numbers (see `parts`)."""
        n = len(self.validation)
        share = range(self.rank * n // self.world, (self.rank + 1) * n // self.world)
        for start in range(share.start, share.stop, batch_size):
            rows = list(range(start, min(start + batch_size, share.stop)))
            yield rows, torch.from_numpy(self.validation[rows]["input_ids"].astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {}  # the position in the data is a function of the step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def prepare(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    seed: int,
    micro_batch_size: int,
    rank: int = 0,
    world: int = 1,
    main_process_first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> BlockData | StreamData | StreamMixture:
    """Load, tokenize and pack the data; split off validation; set up this process's reading. data.seq_len must be
    set (`uptrain_gqa.data.config.fitted` sets it from the model)."""
    if cfg.seq_len is None:
        raise ValueError("prepare needs data.seq_len: fit the config to the model first (data.config.fitted)")
    if tokenizer.eos_token_id is None:
        raise UptrainError("the tokenizer has no EOS token, which separates packed documents; give it one")
    keep_validation_apart(cfg, say=rank == 0)
    if cfg.streaming and cfg.mixture:
        return prepare_stream_mixture(cfg, tokenizer, seed, micro_batch_size, rank, world)
    if cfg.streaming:
        return prepare_stream(cfg, tokenizer, seed, micro_batch_size, rank, world)
    if cfg.mixture:
        return _prepare_mixture(cfg, tokenizer, seed, micro_batch_size, rank, world, main_process_first)
    train, validation = _packed(cfg, tokenizer, main_process_first)
    return BlockData(train, validation, seed, micro_batch_size, rank, world)


def keep_validation_apart(cfg: DataConfig, say: bool = True) -> None:
    """Before any work: refuse a Hub validation split that is the training split, and say (when `say`) which
    training files are left out because they are validation files (training leaves them out: `load_documents`)."""
    held = validation_paths(cfg)
    for _, _, single, where in each_source(cfg):
        check_validation_split(single, where)
        if single.files:
            left_out = training_paths(single, where, held)[1]
            if left_out and say:
                LOGGER.info(left_out_note(where, left_out))


def _packed(
    cfg: DataConfig,
    tokenizer: Any,
    main_process_first: Callable[[], contextlib.AbstractContextManager],
    where: str = "data",
    held: dict[str, str] | None = None,
) -> tuple[Any, Any]:
    """One source's training and validation blocks (`where`, `held`: see `load_documents`)."""
    with main_process_first():  # one process tokenizes; the others then load the cache
        train = pack_dataset(load_documents(cfg, where=where, held=held), tokenizer, cfg)
        held = load_documents(cfg, validation=True)
        validation = pack_dataset(held, tokenizer, cfg) if held is not None else None
    if validation is None:  # the first blocks, in data order, are held out
        if len(train) <= cfg.validation_blocks:
            raise UptrainError(
                f"the data packs into {len(train)} blocks of {cfg.seq_len} tokens, not more than "
                f"data.validation_blocks={cfg.validation_blocks}; add data or hold out fewer blocks"
            )
        validation = train.select(range(cfg.validation_blocks))
        train = train.select(range(cfg.validation_blocks, len(train)))
    else:
        validation = validation.select(range(min(cfg.validation_blocks, len(validation))))
    return train, validation


def _prepare_mixture(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    micro_batch_size: int,
    rank: int,
    world: int,
    main_process_first: Callable[[], contextlib.AbstractContextManager],
) -> BlockData:
    """Each source packed on its own; training blocks interleaved by weight with a fixed seed (the
    same on every process), so the global block order, per-process reading and resume work as for
    one source. A `source` column records where each block came from."""
    from datasets import concatenate_datasets

    trains, validations, parts, weights, start = [], [], [], [], 0
    held = validation_paths(cfg)  # no source trains on any source's validation files
    for index, (label, weight, single) in enumerate(mixture_parts(cfg)):
        where = f"data.mixture[{label}]"
        try:
            train, validation = _packed(single, tokenizer, main_process_first, where, held)
        except UptrainError as e:
            raise UptrainError(str(e) if str(e).startswith(where) else f"{where}: {e}") from e
        trains.append(train.with_format(None).add_column("source", [index] * len(train)))
        validations.append(validation.with_format(None))
        parts.append((label, range(start, start + len(validation))))
        start += len(validation)
        weights.append(weight)
    labels = [label for label, _ in parts]
    mixed = concatenate_datasets(trains).select(interleaving(labels, [len(t) for t in trains], weights, seed))
    validation = concatenate_datasets(validations)
    return BlockData(
        mixed.with_format("numpy"), validation.with_format("numpy"), seed, micro_batch_size, rank, world, parts
    )


def interleaving(labels: list[str], sizes: list[int], weights: list[float], seed: int) -> np.ndarray:
    """Indices into the sources' concatenated blocks: one epoch of the mixture, as many blocks as the sources
    hold together, each position drawn from a source with its weight (seeded: the same on every process
    and rerun). A source whose share exceeds its size cycles through its blocks again. The cost is linear
    in the data whatever the weights (datasets' `all_exhausted` interleaving grows as 1/weight)."""
    for label, size in zip(labels, sizes, strict=True):
        if size == 0:
            raise UptrainError(f"data.mixture[{label}] has no training blocks; add data or drop the source")
    rng = np.random.default_rng(seed)
    p = np.asarray(weights, dtype=np.float64)
    choice = rng.choice(len(sizes), size=sum(sizes), p=p / p.sum())  # (N,) a source per position
    starts = np.cumsum([0, *sizes[:-1]])
    index = np.empty(len(choice), dtype=np.int64)
    for i, size in enumerate(sizes):
        where = np.flatnonzero(choice == i)
        index[where] = starts[i] + np.arange(len(where)) % size  # the source's blocks in order, cycled
    return index
