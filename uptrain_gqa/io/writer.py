"""Write planned tensors into size-capped safetensors shards, streaming.

The whole output (names, dtypes, shapes) is planned before any data is read, so each shard's
header is written first and tensor bytes follow piece by piece: nothing is held whole. Tensors
copied as stored never enter the process: the kernel copies their bytes from the source file
(`copy`), which measured ~2x faster end to end than reading them into memory and writing them out.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.io.tensors import SAFE_INDEX, SAFE_SINGLE, TORCH_TO_ST, TensorSpec

WRITE_BYTES = 8 * 2**20
"""Largest single write() call: very large writes stall on dirty-page throttling."""


class ShardedWriter:
    """Writes planned tensors into size-capped safetensors shards plus an HF index.

    Shards fill greedily in plan order up to `max_shard_size` (a larger tensor gets a shard of
    its own); within a shard, wider dtypes come first so every tensor starts aligned to its
    element size. One shard is written as `model.safetensors`, several as
    `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`.
    Call `write` in the order of `self.order`, then `finish`.
    """

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], max_shard_size: int) -> None:
        self.folder = Path(folder)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        self.shards = [sorted(s, key=lambda t: -t.dtype.itemsize) for s in shards if s]
        n = len(self.shards)
        self.files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [spec for shard in self.shards for spec in shard]
        self._position = [(i, j) for i, shard in enumerate(self.shards) for j in range(len(shard))]
        self._next = 0
        self._handle: object | None = None
        self.bytes_written = 0

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.order)

    def write(self, name: str, data: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Append the next planned tensor, whole or as row chunks (pieces of dim 0, in order)."""
        spec = self._begin()
        pieces = [data] if isinstance(data, torch.Tensor) else data
        rows = 0
        for piece in pieces:
            if name != spec.name or piece.dtype != spec.dtype or tuple(piece.shape[1:]) != spec.shape[1:]:
                raise RuntimeError(
                    f"writer expected {spec.name} {spec.dtype} {spec.shape}, "
                    f"got {name} {piece.dtype} {tuple(piece.shape)}"
                )
            rows += piece.shape[0] if piece.dim() else 1
            buf = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            for start in range(0, buf.size, WRITE_BYTES):  # zero-copy slices
                self._write_all(memoryview(buf[start : start + WRITE_BYTES]))
            self.bytes_written += buf.size
            del piece, buf  # released before the next piece is read: one in memory at a time
        if rows != (spec.shape[0] if spec.shape else 1):
            raise RuntimeError(f"writer got {rows} rows of {spec.name}, planned shape {spec.shape}")
        self._end()

    def copy(self, name: str, source: Path, offset: int, size: int) -> None:
        """Append the next planned tensor as `size` bytes of `source` from `offset`, copied by the kernel
        (copy_file_range, else sendfile, else plain reads and writes)."""
        spec = self._begin()
        if name != spec.name or size != spec.nbytes:
            raise RuntimeError(f"writer expected {spec.name} ({spec.nbytes} bytes), got {name} ({size} bytes)")
        out = self._handle.fileno()  # type: ignore[attr-defined]
        with open(source, "rb", buffering=0) as f:
            done = 0
            while done < size:
                n = _kernel_copy(f, out, offset + done, size - done)
                if n <= 0:
                    raise RuntimeError(f"{source} ended inside tensor {name}")
                done += n
        self.bytes_written += size
        self._end()

    def _begin(self) -> TensorSpec:
        if self._next >= len(self.order):
            raise RuntimeError(f"writer got more than the {len(self.order)} planned tensors")
        shard, pos = self._position[self._next]
        if pos == 0:
            self._open(shard)
        return self.order[self._next]

    def _end(self) -> None:
        shard, pos = self._position[self._next]
        self._next += 1
        if pos == len(self.shards[shard]) - 1:
            self._handle.close()  # type: ignore[attr-defined]
            self._handle = None

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:  # an unbuffered write may take fewer bytes than given
            view = view[self._handle.write(view) :]  # type: ignore[attr-defined]

    def _open(self, shard: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[shard]:
            header[spec.name] = {
                "dtype": TORCH_TO_ST[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
        # unbuffered: tensor bytes are written in large slices or copied by the kernel at the file position
        self._handle = open(self.folder / self.files[shard], "wb", buffering=0)  # noqa: SIM115 (kept open)
        self._write_all(memoryview(struct.pack("<Q", len(blob)) + blob))

    def finish(self) -> list[str]:
        """Check that every planned tensor was written; write the index. Returns the file names."""
        if self._next != len(self.order):
            raise RuntimeError(f"writer got {self._next} of {len(self.order)} planned tensors")
        if len(self.files) > 1:
            index = {
                "metadata": {
                    "total_parameters": sum(s.numel for s in self.order),
                    "total_size": self.total_size,
                },
                "weight_map": {s.name: self.files[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            return [*self.files, SAFE_INDEX]
        return list(self.files)

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()  # type: ignore[attr-defined]
            self._handle = None


def _kernel_copy(source: Any, out: int, offset: int, size: int) -> int:
    """Copy up to `size` bytes of the open file `source` from `offset` to the position of fd `out`;
    returns the bytes copied (0 at the end of `source`)."""
    global _COPY
    if _COPY == "copy_file_range":
        try:
            return os.copy_file_range(source.fileno(), out, size, offset)
        except (AttributeError, OSError):  # other OS or kernel, or across file systems (EXDEV)
            _COPY = "sendfile"
    if _COPY == "sendfile":
        try:
            return os.sendfile(out, source.fileno(), offset, size)
        except (AttributeError, OSError):  # macOS sends files to sockets only
            _COPY = "read"
    source.seek(offset)
    data = source.read(min(size, WRITE_BYTES))
    view = memoryview(data)
    while view.nbytes:
        view = view[os.write(out, view) :]
    return len(data)


_COPY = "copy_file_range"
"""The fastest kernel copy that worked so far in this process."""
