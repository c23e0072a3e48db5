"""Read a Hugging Face checkpoint one tensor at a time, whatever its size.

Memory stays bounded: each read reopens the shard with `safe_open`, so the pages of the memory map
are released after every read instead of accumulating to the shard size, and tensors that are only
copied are read in row chunks (`read_chunks`), so even a 2 GB embedding passes through in pieces
of `CHUNK_BYTES`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from uptrain.errors import UptrainError
from uptrain.io.tensors import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, TensorInfo, dtype_from_name

CHUNK_BYTES = 32 * 2**20
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
        for name, dtype, shape in self._headers(path):
            if wanted is None or name in wanted:
                self.tensors[name] = TensorInfo(name, dtype, shape, path)

    def _headers(self, path: Path) -> Iterator[tuple[str, torch.dtype, tuple[int, ...]]]:
        if self.format == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                        sl = f.get_slice(name)
                        yield name, dtype_from_name(sl.get_dtype()), tuple(sl.get_shape())
            except SafetensorError as e:
                raise UptrainError(f"shard {path.name} is truncated or corrupt ({e}); download it again") from e
        else:
            for name, t in self._load_pickle(path).items():
                yield name, t.dtype, tuple(t.shape)

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if self._pickle_cache and self._pickle_cache[0] == path:
            return self._pickle_cache[1]
        self._pickle_cache = None  # release the previous shard before mapping the next
        try:
            # weights_only: even with --allow-pickle, no arbitrary objects are built
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UptrainError(f"cannot read pickle shard {path.name} ({e}); download it again") from e
        self._pickle_cache = (path, state)
        return state

    def read(self, name: str) -> torch.Tensor:
        """One tensor's data, as stored."""
        info = self.tensors[name]
        if self.format == "pickle":
            return self._load_pickle(info.file)[name]
        from safetensors import safe_open

        # a fresh handle per tensor: closing it unmaps the pages just read (see module doc)
        with safe_open(info.file, framework="pt") as f:
            return f.get_tensor(name)

    def read_chunks(self, name: str, chunk_bytes: int | None = None) -> Iterator[torch.Tensor]:
        """One tensor in pieces of whole rows (dim 0) of at most `chunk_bytes` (at least one row)."""
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        info = self.tensors[name]
        if self.format == "pickle" or not info.shape or info.nbytes <= chunk_bytes:
            yield self.read(name)
            return
        from safetensors import safe_open

        rows = max(1, chunk_bytes // (info.nbytes // info.shape[0]))
        for start in range(0, info.shape[0], rows):
            with safe_open(info.file, framework="pt") as f:  # reopened: see module doc
                yield f.get_slice(name)[start : start + rows]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())
