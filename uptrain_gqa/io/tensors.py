"""Hugging Face weight files: their names, safetensors dtype names, and the spec of one tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from uptrain_gqa.errors import UptrainError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
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
TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


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
    offset: int = -1
    """Where its bytes start in a safetensors file (after the header); -1 for pickle files."""


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _ST_TO_TORCH:
        raise UptrainError(f"unknown safetensors dtype {name}")
    return _ST_TO_TORCH[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refused_pickle(e: Exception) -> str:
    """Why torch's weights_only loading refused a pickle, in one line: the first object it would not build."""
    import re

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    what = f" ({found.group(1)})" if found else ""
    return (
        f"it holds objects other than tensors{what}, which uptrain never unpickles (weights_only loading, even "
        "with --allow-pickle, since building them can run code): use a safetensors copy of the model"
    )
