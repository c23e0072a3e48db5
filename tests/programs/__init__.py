"""Launch programs for the system tests: the real CLI with one thing changed inside it (a signal sent, a disk
that fills, a slow write), each run in a fresh process as `python -m tests.programs.NAME ARGS...`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tests import ROOT


def module(name: str) -> list[str]:
    """What follows `python` (or a launcher: torchrun, accelerate launch) to run program NAME."""
    return ["-m", f"{__name__}.{name}"]


def environment(**extra: str) -> dict[str, str]:
    """This environment for a launched process: offline, one thread per process (several share the CPU), and
    `tests` importable from any working folder."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def on_tensor_writes(hook: Callable[[Any], None], *, after: bool) -> None:
    """Call hook(writer) before (or after) each tensor the shard writer stores: computed (write) or copied as
    stored (copy)."""
    from uptrain_gqa.io.writer import ShardedWriter

    def hooked(original: Callable[..., None]) -> Callable[..., None]:
        def store(self: ShardedWriter, *args: Any) -> None:
            if not after:
                hook(self)
            original(self, *args)
            if after:
                hook(self)

        return store

    ShardedWriter.write = hooked(ShardedWriter.write)
    ShardedWriter.copy = hooked(ShardedWriter.copy)
