"""Checkpoint I/O: read HF weights one tensor at a time, write size-capped safetensors shards.

Memory stays bounded whatever the model size:
- reading reopens the shard with `safe_open` for each read, so the pages of the memory map
  are released after every read instead of accumulating to the shard size;
- tensors that are only copied are read in row chunks (`read_chunks`), so even a 2 GB
  embedding passes through in pieces of `CHUNK_BYTES`;
- writing streams: the whole output (names, dtypes, shapes) is planned before any data is
  read, so each shard's header is written first and tensor bytes follow piece by piece.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uptrain.errors import UptrainError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
CHUNK_BYTES = 32 * 2**20
"""Largest piece a copied tensor is read in."""
WRITE_BYTES = 8 * 2**20
"""Largest single write() call: very large writes stall on dirty-page throttling."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")

# safetensors dtype names <-> torch dtypes
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor: all the writer needs to plan a shard."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor of a source checkpoint and the file that holds it."""

    file: Path = Path()


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _ST_TO_TORCH:
        raise UptrainError(f"unknown safetensors dtype {name}")
    return _ST_TO_TORCH[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
                "dtype": _TORCH_TO_ST[spec.dtype],
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


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object from `path`; `missing` is the message when the file is absent."""
    if not Path(path).is_file():
        raise UptrainError(missing)
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UptrainError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise UptrainError(f"{path} does not hold a JSON object")
    return data


def side_files(folder: Path) -> list[Path]:
    """Non-weight files to carry over (tokenizer, generation config, model card, ...)."""
    skip = {SAFE_INDEX, PICKLE_INDEX, "config.json"}
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES)
    )


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UptrainError(f"cannot write into {folder} (permission denied); choose another output folder")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    A failed, interrupted or killed run leaves no `out` (a killed one may leave a hidden
    `.NAME.uptrain-*` folder beside it, safe to delete). Missing parent folders are created and
    removed again on failure.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise UptrainError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UptrainError(f"{out} exists and is not a folder; choose another output path")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    base = created[-1].parent if created else out.parent  # the deepest folder that exists
    if not base.is_dir():
        raise UptrainError(f"cannot create {out}: {base} is not a folder")
    _check_writable(base)
    if created:
        out.parent.mkdir(parents=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.uptrain-", dir=out.parent))
    except OSError as e:
        raise UptrainError(f"cannot write into {out.parent} ({e.strerror}); choose another output folder") from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700 folders; OUT gets the usual permissions
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.uptrain-old-", dir=out.parent))
            os.replace(out, old / "old")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
