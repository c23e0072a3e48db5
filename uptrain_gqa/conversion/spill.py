"""Tensors kept on disk beside the output while a conversion runs, one safetensors file per layer.

Each layer's converted attention, read back one tensor at a time."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


def spill(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as the safetensors file `path`, a spill beside the output. A write the OS refuses (a full
    disk above all) raises the OSError the final shard writer raises, without the spill's internal path, so it
    reads as the same one line; safetensors' own error type would end in a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except (OSError, SafetensorError) as e:
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (found := re.search(r"\(os error (\d+)\)", str(e))):  # safetensors: "... (os error 28)"
            code = int(found[1])
        if code is None:
            raise
        raise OSError(code, os.strerror(code)) from e


class LayerStore(Mapping[str, torch.Tensor]):
    """{tensor name: tensor as it is written}, one safetensors file per layer in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, Path] = {}

    def put(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.folder / f"layer-{layer:05d}.safetensors"
        spill({n: t.detach().contiguous() for n, t in tensors.items()}, path)
        self._where |= dict.fromkeys(tensors, path)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def job(self, name: str) -> Callable[[Any], torch.Tensor]:
        """A step's job that hands out the stored tensor `name` (the reader is not needed)."""
        return lambda _reader: self[name]
