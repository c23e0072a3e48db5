"""Streamed training data: each process reads its own part of a stream, packed on the fly.

A stream is split by process (`split_dataset_by_node`), shuffled and packed into blocks of
`seq_len` as it is read; held-out documents are picked by a hash of their text (or come from a
validation split or files), and the stream's position is saved in checkpoints.

One source (`StreamData`) is shuffled by datasets' buffer. Its resume restores the stream position
but not the buffer, which datasets refills with the documents that follow: bitwise only with
`data.shuffle_buffer: 1`.

A mixture (`StreamMixture`) interleaves its sources by weight. Which source global training
position p takes is a pure function of (seed, p) (`SourceOrder`), and process r of P reads, for
global micro-batch i, positions [i·P·b + r·b, i·P·b + (r+1)·b) as `BlockData` does, each the next
block of the chosen source from its own part of that source. So the source of every position is the
same on a rerun and on any number of processes (the blocks themselves come from each process's part).
Each source is shuffled by uptrain, not by datasets' buffer: its documents are read in windows of
`data.shuffle_buffer`, each window permuted by a generator seeded by (seed, source, process, epoch,
window), and packed PACK_DOCS documents at a time (`SourceStream`); the order of the files or Hub
shards is shuffled per epoch by datasets. A checkpoint holds, per source, the datasets state where
the current window starts and how far into it this process has read, so resuming is bitwise with
any shuffle buffer (same data, same number of processes). What a resume costs, per source and
process: datasets skips the files (shards) before the window without opening them and reads the one
the window starts in from its beginning up to there, discarding what it reads (a Hub parquet shard
is streamed again up to there: at most one shard); then the window's documents are read again and
the PACK_DOCS-document batch it stopped in is tokenized again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from uptrain_gqa.data.config import HOLDOUT_PERCENT, DataConfig, mixture_parts, validation_paths
from uptrain_gqa.data.documents import load_documents, packer, require_column
from uptrain_gqa.errors import UptrainError

SOURCE_DRAWS = 4096  # a mixture's positions whose sources one seeded draw decides
PACK_DOCS = 256  # documents tokenized and packed together (the tail under seq_len tokens is dropped)
MIXTURE = 0x6D6978  # mixed into a mixture's seeds, apart from the map-style block order's (seed, epoch)


@contextlib.contextmanager
def _reading(where: str = "") -> Iterator[None]:
    """A data file gone while its stream is read (deleted, renamed, unmounted): datasets' FileNotFoundError
    names only the path; said in one line with what to do. `where`: a mixture source's "data.mixture[LABEL]: "."""
    try:
        yield
    except FileNotFoundError as e:
        path = e.filename or (e.args[0] if e.args else "")
        raise UptrainError(
            f"{where}the data file {path} disappeared while streaming; restore it, then continue the run with "
            "`uptrain train ... --resume auto`"
        ) from e


def _held_out(text: str) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HOLDOUT_PERCENT


class StreamData:
    """One stream split by process (`split_dataset_by_node`), shuffled with a buffer, packed on the fly."""

    streaming = True

    def __init__(self, stream: Any, validation: torch.Tensor, micro_batch_size: int) -> None:
        self.stream, self.validation = stream, validation
        self.micro_batch_size = micro_batch_size
        self._iterator: Iterator[dict[str, Any]] | None = None

    def micro_batch(self, micro_index: int) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = iter(self.stream)
        rows = []
        with _reading():
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


def _split(
    cfg: DataConfig, tokenizer: Any, rank: int, world: int, where: str = "data", held: dict[str, str] | None = None
) -> tuple[Any, torch.Tensor]:
    """One source's training documents for this process (a stream) and its share of the validation
    blocks, (n, seq_len) int64: from the validation split or files, else held out by a hash of the text.
    `where`, `held`: see `load_documents`."""
    from datasets.distributed import split_dataset_by_node

    raw = split_dataset_by_node(load_documents(cfg, where=where, held=held), rank, world)
    require_column(raw, cfg.text_column)
    held = load_documents(cfg, validation=True)
    column = cfg.text_column
    by_hash = held is None
    if by_hash:
        held = raw.filter(lambda ex: _held_out(ex[column]))
        raw = raw.filter(lambda ex: not _held_out(ex[column]))
    else:
        held = split_dataset_by_node(held, rank, world)
    want = cfg.validation_blocks // world + (rank < cfg.validation_blocks % world)
    val_rows = [row["input_ids"] for row in itertools.islice(_stream_blocks(held, tokenizer, cfg), want)]
    if want and not val_rows:
        given = f"{where}.validation_files" if cfg.validation_files or not cfg.dataset else f"{where}.validation_split"
        if by_hash:  # a mixture accepts validation files or a split per source, never data.validation_split
            split = f" or {where}.validation_split (a Hub split)" if cfg.dataset else ""
            raise UptrainError(
                f"found no held-out validation documents in the stream (about {HOLDOUT_PERCENT} % of documents are "
                f"held out by a hash of their text, and these made no block of data.seq_len={cfg.seq_len} tokens); "
                f"give {where}.validation_files (local files held out for validation){split}"
            )
        raise UptrainError(
            f"{given} made no validation block of data.seq_len={cfg.seq_len} tokens"
            f"{f' for process {rank} of {world}' if world > 1 else ''}; give more validation text"
        )
    validation = torch.tensor(np.asarray(val_rows, dtype=np.int64).reshape(-1, cfg.seq_len))
    return raw, validation


def prepare_stream(
    cfg: DataConfig, tokenizer: Any, seed: int, micro_batch_size: int, rank: int, world: int
) -> StreamData:
    raw, validation = _split(cfg, tokenizer, rank, world)
    train = _stream_blocks(raw.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer), tokenizer, cfg)
    return StreamData(train, validation, micro_batch_size)


class SourceOrder:
    """Which source each global training position of a mixture takes: a pure function of (seed,
    position). Positions come in chunks of SOURCE_DRAWS, chunk c drawn by weight from a generator
    seeded by (seed, c), so a position's source needs neither the positions before it nor the number
    of processes."""

    def __init__(self, weights: list[float], seed: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        self.bounds = np.cumsum(w / w.sum())  # (S,) where each source's share of [0, 1) ends
        self.seed = seed
        self._chunk, self._sources = -1, np.empty(0, dtype=np.int64)

    def sources(self, start: int, count: int) -> np.ndarray:
        """Source indices of global positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        for i, pos in enumerate(range(start, start + count)):
            chunk, offset = divmod(pos, SOURCE_DRAWS)
            if chunk != self._chunk:
                draws = np.random.default_rng([self.seed, MIXTURE, chunk]).random(SOURCE_DRAWS)
                # a rounded last bound below 1 must not give a source past the end
                self._sources = np.minimum(np.searchsorted(self.bounds, draws, side="right"), len(self.bounds) - 1)
                self._chunk = chunk
            out[i] = self._sources[offset]
        return out


@contextlib.contextmanager
def _restoring() -> Iterator[None]:
    """datasets warns, on the first read after a restore, that a shuffle buffer is refilled; a source's
    buffer here holds one document (the shuffle is the window's), so nothing is lost: not said."""

    def keep(record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()

    logger = logging.getLogger("datasets.iterable_dataset")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class SourceStream:
    """One source of a streamed mixture, on this process: its part of the documents, read in windows of
    data.shuffle_buffer documents (at least PACK_DOCS), each permuted by a generator seeded by (seed,
    source, process, epoch, window) and packed PACK_DOCS documents at a time. Its state is the datasets
    state where the window starts and how far into the window this process has read; restoring it reads
    the window again and packs only the batch it stopped in, so the next blocks are bitwise those an
    uninterrupted run reads."""

    def __init__(
        self, label: str, docs: Any, tokenizer: Any, cfg: DataConfig, seed: int, index: int, rank: int
    ) -> None:
        self.label, self.docs, self.rank = label, docs, rank
        self.key = [seed, MIXTURE, index, rank]
        # a smaller window would pack fewer documents together, dropping a block's tail more often
        self.column, self.window_size, self.seq_len = cfg.text_column, max(cfg.shuffle_buffer, PACK_DOCS), cfg.seq_len
        self.pack = packer(tokenizer, cfg.text_column, cfg.seq_len)
        # the position: epoch over the source, window of that epoch, PACK_DOCS batch of that window, blocks taken
        self.epoch = self.window = self.batch = self.taken = 0
        self.start: dict[str, Any] | None = None  # datasets state where the window starts; None: the epoch's start
        self._texts: list[str] | None = None  # the window's documents, permuted; None: to be read
        self._blocks = np.empty((0, cfg.seq_len), dtype=np.int32)  # (n, seq_len) the batch's blocks
        self._after: dict[str, Any] | None = None  # datasets state after the window
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._dry_epochs = 0  # epoch ends without a block in between: a part that packs into nothing

    def next_block(self) -> np.ndarray:
        """The next training block of this source on this process: (seq_len,) int32."""
        while True:
            if self._texts is None:
                self._read_window()
            if self.taken < len(self._blocks):
                self.taken += 1
                return self._blocks[self.taken - 1]
            if (self.batch + 1) * PACK_DOCS < len(self._texts):  # the window's next batch
                self.batch, self.taken = self.batch + 1, 0
                self._blocks = self._packed()
            elif self._texts:  # the next window
                self.window, self.batch, self.taken, self.start = self.window + 1, 0, 0, self._after
                self._texts = None
            else:  # the epoch is over: the next one, with another order of the files or shards
                self._dry_epochs += 1
                if self._dry_epochs > 1:
                    raise UptrainError(
                        f"data.mixture[{self.label}]: process {self.rank}'s part of the stream holds no block of "
                        f"data.seq_len={self.seq_len} tokens; add data to this source or use fewer processes"
                    )
                self.epoch, self.window, self.batch, self.taken, self.start = self.epoch + 1, 0, 0, 0, None
                self._texts, self._iterator = None, None

    def _read_window(self) -> None:
        with _restoring(), _reading(f"data.mixture[{self.label}]: "):
            if self._iterator is None:  # at an epoch's start, or restored
                self.docs.set_epoch(self.epoch)
                if self.start is not None:
                    self.docs.load_state_dict(self.start)
                self._iterator = iter(self.docs)
            texts = [row[self.column] for row in itertools.islice(self._iterator, self.window_size)]
        self._after = self.docs.state_dict()
        order = np.random.default_rng([*self.key, self.epoch, self.window]).permutation(len(texts))
        self._texts = [texts[i] for i in order]
        self._blocks = self._packed()

    def _packed(self) -> np.ndarray:
        assert self._texts is not None
        docs = self._texts[self.batch * PACK_DOCS : (self.batch + 1) * PACK_DOCS]
        rows = self.pack({self.column: docs})["input_ids"] if docs else []
        if rows:
            self._dry_epochs = 0
        return np.asarray(rows, dtype=np.int32).reshape(-1, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        position = {"epoch": self.epoch, "window": self.window, "batch": self.batch, "taken": self.taken}
        return {**position, "start": copy.deepcopy(self.start)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.window, self.batch = state["epoch"], state["window"], state["batch"]
        self.taken, self.start = state["taken"], state["start"]
        self._texts, self._iterator = None, None


class StreamMixture:
    """Streamed sources interleaved by weight (see the module's docstring). Validation blocks are this
    process's share of each source's, one source after another, `parts` naming each source's rows."""

    streaming = True

    def __init__(
        self,
        sources: list[SourceStream],
        weights: list[float],
        validation: torch.Tensor,
        parts: list[tuple[str, range]],
        seed: int,
        micro_batch_size: int,
        rank: int,
        world: int,
    ) -> None:
        self.sources, self.validation, self.parts = sources, validation, parts
        self.order = SourceOrder(weights, seed)
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.next_micro = 0  # the global micro-batch this process reads next

    def source_ids(self, micro_index: int) -> np.ndarray:
        """Which source each of this process's sequences of global micro-batch `micro_index` comes from."""
        b = self.micro_batch_size
        return self.order.sources(micro_index * self.world * b + self.rank * b, b)

    def micro_batch(self, micro_index: int) -> torch.Tensor:
        """This process's sequences of global micro-batch `micro_index`: (b, seq_len) int64. A stream is
        read forward: an earlier micro-batch is refused, a later one reads past those in between."""
        if micro_index < self.next_micro:
            raise UptrainError(
                f"streamed data is read forward only: micro-batch {micro_index} asked after {self.next_micro - 1}; "
                "resume from a checkpoint to read earlier data again"
            )
        while self.next_micro <= micro_index:
            rows = [self.sources[s].next_block() for s in self.source_ids(self.next_micro)]
            self.next_micro += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def validation_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for _, ids in self.validation_rows(batch_size):
            yield ids

    def validation_rows(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """This process's validation blocks, with their row numbers (see `parts`)."""
        for start in range(0, len(self.validation), batch_size):
            rows = list(range(start, min(start + batch_size, len(self.validation))))
            yield rows, self.validation[start : start + batch_size]

    def state_dict(self) -> dict[str, Any]:
        sources = {s.label: s.state_dict() for s in self.sources}
        return {"rank": self.rank, "world": self.world, "next_micro": self.next_micro, "sources": sources}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("rank"), state.get("world")) != (self.rank, self.world):
            raise UptrainError(
                f"the checkpoint's stream positions are process {state.get('rank')} of {state.get('world')}'s, "
                f"not process {self.rank} of {self.world}'s; resume with {state.get('world')} processes"
            )
        labels = [s.label for s in self.sources]
        if sorted(state["sources"]) != sorted(labels):
            raise UptrainError(
                f"the checkpoint's stream positions are for sources {', '.join(sorted(state['sources']))}, "
                f"not {', '.join(sorted(labels))}; resume with the run's own data.mixture"
            )
        self.next_micro = state["next_micro"]
        for source in self.sources:
            source.load_state_dict(state["sources"][source.label])


def prepare_stream_mixture(
    cfg: DataConfig, tokenizer: Any, seed: int, micro_batch_size: int, rank: int, world: int
) -> StreamMixture:
    """Each source split by process, its validation blocks held out, its training documents set up
    to be shuffled in windows and packed as they are read."""
    sources, validations, parts, weights, start = [], [], [], [], 0
    held = validation_paths(cfg)  # no source trains on any source's validation files
    for index, (label, weight, single) in enumerate(mixture_parts(cfg)):
        where = f"data.mixture[{label}]"
        try:
            docs, validation = _split(single, tokenizer, rank, world, where, held)
        except UptrainError as e:
            raise UptrainError(str(e) if str(e).startswith(where) else f"{where}: {e}") from e
        docs = docs.select_columns([single.text_column])
        # a buffer of one document: datasets only shuffles the order of the files or shards (per epoch);
        # the documents are shuffled in windows by SourceStream, which resumes bitwise
        shard_order = np.random.default_rng([seed, MIXTURE, index])
        one_reader = {"max_buffer_input_shards": 1}  # newer datasets: no threads interleaving the shards
        if "max_buffer_input_shards" not in inspect.signature(docs.shuffle).parameters:
            one_reader = {}
        docs = docs.shuffle(generator=shard_order, buffer_size=1, **one_reader)
        sources.append(SourceStream(label, docs, tokenizer, single, seed, index, rank))
        validations.append(validation)
        parts.append((label, range(start, start + len(validation))))
        start += len(validation)
        weights.append(weight)
    validation = torch.cat(validations)
    return StreamMixture(sources, weights, validation, parts, seed, micro_batch_size, rank, world)
