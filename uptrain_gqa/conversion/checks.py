"""Checks on the source: attention tensor shapes against config.json, and every value for NaN/inf.

Shapes are checked before anything is written; values while they stream through the conversion.

A checkpoint whose weights disagree with its config (wrong head count, head_dim, layer count, a
missing tensor) is refused with the tensor's name and both shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.reader import read_exactly
from uptrain_gqa.io.tensors import TensorInfo
from uptrain_gqa.model.shape import ModelShape


class TensorChecks:
    """Lookups and shape checks over a checkpoint's tensor headers."""

    def __init__(self, tensors: Mapping[str, TensorInfo], shape: ModelShape) -> None:
        self.tensors, self.shape = tensors, shape

    def tensor(self, name: str, required: bool = False) -> TensorInfo | None:
        info = self.tensors.get(name)
        if info is None and required:
            raise UptrainError(
                f"the checkpoint has no tensor {name}, which a {self.shape.model_type} model with "
                f"{self.shape.layers} layers needs; config.json and the weights do not match"
            )
        return info

    def rows(self, info: TensorInfo, rows: int, what: str) -> None:
        """A projection (or its bias) with `rows` output rows over the hidden size."""
        s = self.shape
        ok = info.shape[:1] == (rows,) and (len(info.shape) == 1 or info.shape[1:] == (s.hidden,))
        if not ok:
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies {rows} rows "
                f"({what}, head_dim {s.head_dim}, hidden {s.hidden}); config and weights disagree"
            )

    def output_projection(self, info: TensorInfo) -> None:
        s = self.shape
        if info.shape != (s.hidden, s.heads * s.head_dim):
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies "
                f"{[s.hidden, s.heads * s.head_dim]}"
            )

    def norm(self, info: TensorInfo, expected: tuple[int, ...]) -> None:
        if info.shape != expected:
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies {list(expected)} "
                f"({self.shape.kv_heads} KV heads, head_dim {self.shape.head_dim}); config and weights disagree"
            )

    def no_extra_layers(self, attention: str) -> None:
        """Attention tensors of layers beyond config's count would be copied unconverted.
        `attention` is the family's prefix template, e.g. 'model.layers.{layer}.self_attn'."""
        pattern = re.compile(re.escape(attention).replace(re.escape("{layer}"), r"(\d+)") + r"\.")
        for name in self.tensors:
            m = pattern.match(name)
            if m and int(m.group(1)) >= self.shape.layers:
                raise UptrainError(
                    f"the checkpoint has {name} but config.json says {self.shape.layers} layers; "
                    "config and weights disagree"
                )


FINITE_PIECE = 2**18
"""Elements per piece of the finiteness test: its scratch buffer stays in cache, whatever the tensor's size."""

# float dtype -> (integer view of the same width, its exponent bits, its bits without the sign)
_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80, 0x7FFF),
    torch.float16: (torch.int16, 0x7C00, 0x7FFF),
    torch.float32: (torch.int32, 0x7F800000, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF),
}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`, at a fraction of the cost of reading its bytes.

    A float is NaN or inf exactly when its exponent bits are all ones, i.e. when its bits without the
    sign, read as an integer, reach the all-ones exponent. So the test masks an integer view into one
    small reused buffer and takes its max, piece by piece: no full-size boolean copy as
    `torch.isfinite(t).all()` makes. numpy runs it on one core, faster than the disk reads; torch's threaded
    ops slow down badly when another process holds the cores (docs/results.md)."""
    if not t.is_floating_point():
        return True
    flat = t.detach().reshape(-1).cpu()  # (N,)
    bits = _BITS.get(t.dtype)
    if bits is None:  # float8 and other rare formats: the plain test, piece by piece
        return all(
            bool(torch.isfinite(flat[i : i + FINITE_PIECE].float()).all()) for i in range(0, flat.numel(), FINITE_PIECE)
        )
    ints = flat.view(bits[0]).numpy()
    scratch = np.empty(min(FINITE_PIECE, ints.size), ints.dtype)
    return all(_finite_bits(ints[i : i + FINITE_PIECE], bits, scratch) for i in range(0, ints.size, FINITE_PIECE))


def _finite_bits(ints: np.ndarray, bits: tuple[torch.dtype, int, int], scratch: np.ndarray) -> bool:
    """The exponent test on one piece of an integer view (see all_finite); `scratch` may be `ints` itself."""
    masked = scratch[: ints.size]
    np.bitwise_and(ints, bits[2], out=masked)
    return ints.size == 0 or int(masked.max()) < bits[1]


def file_finite(file: Path, offset: int, size: int, dtype: torch.dtype, name: str) -> bool:
    """No NaN or inf in tensor `name`: `size` bytes of `file` from `offset`, holding `dtype` values (of _BITS).

    The bytes go through one reused 1 MiB buffer with plain reads: nothing is mapped or allocated per
    tensor, and the checked bytes need not be in memory when the kernel copies them to the output."""
    bits = _BITS[dtype]
    buffer = np.empty(2**20, np.uint8)
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        left = size
        while left:
            want = min(left, buffer.size)
            read_exactly(f, memoryview(buffer)[:want], name)
            ints = buffer[:want].view(np.dtype(str(bits[0]).removeprefix("torch.")))
            if not _finite_bits(ints, bits, ints):  # masked in place: the buffer is ours
                return False
            left -= want
    return True


def cast_can_overflow(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting finite `source` values to `target` can give inf (float32 -> float16, and, by
    rounding near the top of the range, float32 -> bfloat16); widening casts and no cast cannot."""
    if source == target or not target.is_floating_point:
        return False
    return not source.is_floating_point or torch.finfo(target).max < torch.finfo(source).max


class FiniteReader:
    """The checkpoint reader, checking every tensor it hands out for NaN and inf as it streams by.

    Non-finite values in an attention weight would spread through the merge into every head of its
    group (and make a least-squares merge fail), so they stop the conversion; elsewhere they pass
    through unchanged and are reported once per tensor (saying what happens to them: `passing`). A tensor is
    checked once: later reads of it (calibration, then the merge) pass unchecked, since the files do not change
    during a conversion.

    Tensors the kernel copies as stored (`copyable`) are checked on other cores while it copies; call
    `wait` before the output is finished (it raises what they found) and `close` in any case."""

    def __init__(
        self,
        reader: Any,
        attention: Callable[[str], bool],
        warn: Callable[[str], None],
        passing: str = "copied unchanged",
    ) -> None:
        self.reader, self.attention, self.warn, self.passing = reader, attention, warn, passing
        self.reported: set[str] = set()
        self.checked: set[str] = set()
        workers = max(1, min(4, (os.cpu_count() or 2) - 1))  # one core stays with the copy
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="uptrain-check")
        self._pending: list[Future[None]] = []

    def wait(self) -> None:
        """Wait for the checks of copied tensors; raise the first refusal they found."""
        for future in self._pending:
            future.result()
        self._pending.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __getattr__(self, name: str) -> Any:  # tensors, num_parameters, ...: the reader's own
        return getattr(self.reader, name)

    def read(self, name: str) -> torch.Tensor:
        t = self.reader.read(name)
        if name not in self.checked:
            self._check(name, t)
            self.checked.add(name)
        return t

    def copyable(self, name: str) -> tuple[Path, int, int] | None:
        """For a tensor written as stored: where its bytes lie (file, offset, size), checked for NaN/inf,
        so the writer can copy them in the kernel; None when it must be read as tensors (pickle files,
        float8)."""
        where = self.reader.byte_range(name)
        dtype = self.reader.tensors[name].dtype
        if where is None or (dtype.is_floating_point and dtype not in _BITS):
            return None
        if name not in self.checked and dtype.is_floating_point:
            self._pending.append(self._pool.submit(self._check_file, name, where, dtype))
        self.checked.add(name)
        return where

    def _check_file(self, name: str, where: tuple[Path, int, int], dtype: torch.dtype) -> None:
        if not file_finite(*where, dtype, name):  # numpy and reads release the GIL: this runs beside the copy
            bad = sum(int((~torch.isfinite(c)).sum()) for c in self.reader.read_chunks(name))  # rare: count
            self._report(name, bad)

    def read_chunks(self, name: str, chunk_bytes: int | None = None) -> Iterator[torch.Tensor]:
        known = name in self.checked
        for chunk in self.reader.read_chunks(name, chunk_bytes):
            if not known:
                self._check(name, chunk)
            yield chunk
            del chunk  # not held while the next one is read
        self.checked.add(name)  # only once every chunk was read and checked

    def _check(self, name: str, t: torch.Tensor) -> None:
        if not all_finite(t):
            self._report(name, int((~torch.isfinite(t)).sum()))  # the rare path: count them for the message

    def _report(self, name: str, bad: int) -> None:
        if self.attention(name):
            raise UptrainError(
                f"{name} holds {bad:,} NaN/inf values; the source checkpoint is damaged (re-download it) "
                "and its attention cannot be merged"
            )
        if name not in self.reported:
            self.reported.add(name)
            self.warn(f"{name} holds {bad:,} NaN/inf values ({self.passing}; the source is damaged)")


def check_cast(name: str, chunk: torch.Tensor) -> torch.Tensor:
    """Refuse an output chunk a dtype cast made non-finite (the source was checked finite on reading)."""
    if not all_finite(chunk):
        limit = torch.finfo(chunk.dtype).max
        raise UptrainError(
            f"casting {name} to {str(chunk.dtype).removeprefix('torch.')} overflows: it holds values beyond "
            f"±{limit:,.0f}; use --dtype bfloat16 (same range as float32) or keep the source dtype"
        )
    return chunk
