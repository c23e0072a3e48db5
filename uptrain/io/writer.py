"""Write planned tensors into size-capped safetensors shards, streaming.

The whole output (names, dtypes, shapes) is planned before any data is read, so each shard's
header is written first and tensor bytes follow piece by piece: nothing is held whole.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from uptrain.io.tensors import SAFE_INDEX, SAFE_SINGLE, TORCH_TO_ST, TensorSpec

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
        spec = self.order[self._next]
        pieces = [data] if isinstance(data, torch.Tensor) else data
        shard, pos = self._position[self._next]
        if pos == 0:
            self._open(shard)
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
                self._handle.write(buf[start : start + WRITE_BYTES])  # type: ignore[attr-defined]
            self.bytes_written += buf.size
            del piece, buf  # released before the next piece is read: one in memory at a time
        if rows != (spec.shape[0] if spec.shape else 1):
            raise RuntimeError(f"writer got {rows} rows of {spec.name}, planned shape {spec.shape}")
        self._next += 1
        if pos == len(self.shards[shard]) - 1:
            self._handle.close()  # type: ignore[attr-defined]
            self._handle = None

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
        self._handle = open(self.folder / self.files[shard], "wb")  # noqa: SIM115 (kept open across write calls)
        self._handle.write(struct.pack("<Q", len(blob)) + blob)

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
