"""The merge methods by name: `uptrain convert --method` and `plan --quality` ask here.

A new method is one `MergeMethod` class (conversion/merge_method.py says what it answers) and one line in
`REGISTRY`; the CLI's choices follow.
"""

from __future__ import annotations

from typing import Literal

from uptrain_gqa.conversion.least_squares import LeastSquares
from uptrain_gqa.conversion.merge_method import MergeMethod
from uptrain_gqa.conversion.pooling import First, Mean, RandomInit
from uptrain_gqa.errors import UptrainError

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (Mean(), First(), RandomInit(), LeastSquares())}
METHODS: tuple[str, ...] = tuple(REGISTRY)
Method = Literal[METHODS]  # type: ignore[valid-type]  # the registry's names: --method's choices
RECOMMENDED = LeastSquares.name
"""What `plan --quality` measures each G with, and what convert recommends."""

Grouping = Literal["contiguous", "similarity"]
GROUPINGS: tuple[str, ...] = ("contiguous", "similarity")


def merge_method(name: str) -> MergeMethod:
    """The method registered as `name`."""
    if name not in REGISTRY:
        raise UptrainError(f"unknown merge method {name!r}; choose from {', '.join(METHODS)}")
    return REGISTRY[name]
