"""Sizes as people write them: parse '5GB' / '2GiB', print bytes and counts with their units.

GB/MB/KB are decimal (10⁹, 10⁶, 10³), GiB/MiB/KiB binary (2³⁰, ...), as in transformers and
on GPU spec sheets; every printed figure names its unit.
"""

from __future__ import annotations

import re

from uptrain_gqa.errors import UptrainError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5·10⁹ bytes, '500MiB' -> 500·2²⁰, '1000' -> 1000."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise UptrainError(f"cannot read size '{text}'; write it like 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UptrainError(f"size must be positive, got '{text}'")
    return size


def byte_unit(largest: float, binary: bool = False) -> tuple[str, float]:
    """(name, bytes) of the unit that shows `largest` bytes as 1 to 999.99 of it: B, kB, MB, GB or TB (B, KiB,
    MiB, GiB or TiB with binary=True)."""
    step, names = (1024.0, ["B", "KiB", "MiB", "GiB", "TiB"]) if binary else (1000.0, ["B", "kB", "MB", "GB", "TB"])
    size = 1.0
    for name in names[:-1]:
        if abs(largest) < size * step:
            return name, size
        size *= step
    return names[-1], size


def format_bytes(n: float, binary: bool = False) -> str:
    """1_340_000_000 -> '1.34 GB' (binary=True -> '1.25 GiB')."""
    name, size = byte_unit(n, binary)
    return f"{n:.0f} B" if name == "B" else f"{n / size:.2f} {name}"


def format_count(n: float) -> str:
    """6_738_415_616 -> '6.74 B' (parameters, tokens)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f}"
