"""Read a Hugging Face checkpoint one tensor at a time, whatever its size.

Shards are validated with `safe_open` when the reader opens them; tensor bytes are then read with
plain `readinto` calls at the offsets the safetensors header gives, straight into the tensor that is
returned: one copy from the page cache, and no memory map whose touched pages would count in the
process's memory until it is closed. Tensors read piecewise come in row chunks (`read_chunks`), so
even a 2 GB embedding passes through in pieces of `CHUNK_BYTES`; tensors copied as they are need no
tensor at all: `byte_range` says where their bytes lie, for the writer to copy them in the kernel.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.io.tensors import (
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    TensorInfo,
    dtype_from_name,
    refused_pickle,
)

CHUNK_BYTES = 16 * 2**20
"""Largest piece a copied tensor is read in."""


class CheckpointReader:
    """Lazy view of a HF checkpoint folder: headers at open, tensor data on request.

    Opening validates the layout (index, every shard present and complete, every indexed tensor
    in its shard) so that a broken checkpoint fails before anything is written.
    """

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        self._pickle_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        if (self.folder / SAFE_INDEX).is_file():
            self.format, weight_map = "safetensors", self._weight_map(SAFE_INDEX)
        elif (self.folder / SAFE_SINGLE).is_file():
            self.format, weight_map = "safetensors", None
        elif (self.folder / PICKLE_INDEX).is_file() or (self.folder / PICKLE_SINGLE).is_file():
            found = PICKLE_INDEX if (self.folder / PICKLE_INDEX).is_file() else PICKLE_SINGLE
            if not allow_pickle:
                raise UptrainError(
                    f"{self.folder} holds only pickle weights ({found}); unpickling can run arbitrary code, "
                    "so uptrain refuses it — use a safetensors copy, or pass --allow-pickle if you trust the source"
                )
            self.format = "pickle"
            weight_map = self._weight_map(PICKLE_INDEX) if found == PICKLE_INDEX else None
        else:
            raise UptrainError(
                f"no weights in {self.folder}: expected {SAFE_SINGLE} or {SAFE_INDEX} "
                "(a Hugging Face checkpoint folder)"
            )
        single = SAFE_SINGLE if self.format == "safetensors" else PICKLE_SINGLE
        files = sorted(set(weight_map.values())) if weight_map else [single]
        for file in files:
            self._scan(self.folder / file, weight_map)
        if weight_map:
            for name, file in weight_map.items():
                if name not in self.tensors:
                    raise UptrainError(
                        f"the index lists tensor {name} in {file} but that shard does not hold it; "
                        "the index and the shards come from different checkpoints — download them again"
                    )

    def _weight_map(self, index_name: str) -> dict[str, str]:
        try:
            index = json.loads((self.folder / index_name).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UptrainError(f"{self.folder / index_name} is not a valid index ({e}); download it again") from e
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise UptrainError(
                f"shard {missing[0]} listed in {index_name} is missing from {self.folder}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; the download is incomplete — fetch the checkpoint again"
            )
        return weight_map

    def _scan(self, path: Path, weight_map: dict[str, str] | None) -> None:
        wanted = None if weight_map is None else {n for n, f in weight_map.items() if f == path.name}
        for name, dtype, shape, offset in self._headers(path):
            if wanted is None or name in wanted:
                self.tensors[name] = TensorInfo(name, dtype, shape, path, offset)

    def _headers(self, path: Path) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], int]]:
        if self.format == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="pt") as f:  # validates the header against the file's size
                    names = list(f.keys())
            except SafetensorError as e:
                raise UptrainError(f"shard {path.name} is truncated or corrupt ({e}); download it again") from e
            with open(path, "rb") as f:  # the offsets, which safe_open does not expose
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name in names:
                entry = header[name]
                yield name, dtype_from_name(entry["dtype"]), tuple(entry["shape"]), 8 + size + entry["data_offsets"][0]
        else:
            for name, t in self._load_pickle(path).items():
                yield name, t.dtype, tuple(t.shape), -1

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if self._pickle_cache and self._pickle_cache[0] == path:
            return self._pickle_cache[1]
        self._pickle_cache = None  # release the previous shard before mapping the next
        try:
            # weights_only: even with --allow-pickle, no arbitrary objects are built
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refused an object: the file is not damaged
            raise UptrainError(f"pickle shard {path.name}: {refused_pickle(e)}") from e
        except Exception as e:
            raise UptrainError(f"cannot read pickle shard {path.name} ({first_line(e)}); download it again") from e
        self._pickle_cache = (path, state)
        return state

    def read(self, name: str) -> torch.Tensor:
        """One tensor's data, as stored, in memory of its own."""
        info = self.tensors[name]
        if self.format == "pickle":
            return self._load_pickle(info.file)[name]
        return self._read_rows(info, 0, info.shape[0] if info.shape else 1)

    def read_chunks(self, name: str, chunk_bytes: int | None = None) -> Iterator[torch.Tensor]:
        """One tensor in pieces of whole rows (dim 0) of at most `chunk_bytes` (at least one row)."""
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        info = self.tensors[name]
        if self.format == "pickle" or not info.shape or info.nbytes <= chunk_bytes:
            yield self.read(name)
            return
        rows = max(1, chunk_bytes // (info.nbytes // info.shape[0]))
        for start in range(0, info.shape[0], rows):
            yield self._read_rows(info, start, min(start + rows, info.shape[0]))

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """Where a tensor's bytes lie in its safetensors file: (file, offset, size); None in pickle files."""
        info = self.tensors[name]
        return None if self.format == "pickle" else (info.file, info.offset, info.nbytes)

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a safetensors tensor (a 0-d tensor is one row), read into a new tensor."""
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        out = torch.empty(shape, dtype=info.dtype)
        row_bytes = info.nbytes // max(1, info.shape[0]) if info.shape else info.nbytes
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # writable, shares out's memory
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset + start * row_bytes)
            read_exactly(f, view, info.name)
        return out

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def read_exactly(f: BinaryIO, view: memoryview, name: str) -> None:
    """Fill `view` from the open shard `f` at its position (plain reads may return less than asked);
    a shard that ends first was truncated or replaced under the reader: one line naming tensor `name`."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise UptrainError(
                f"shard {Path(f.name).name} ended inside tensor {name}: it was truncated or replaced while uptrain "
                "read it; download it again"
            )
        done += got
