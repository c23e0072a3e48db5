"""The non-finite test on every tensor a conversion reads, against torch.isfinite itself."""

from __future__ import annotations

import pytest
import torch

from uptrain_gqa.conversion.checks import FINITE_PIECE, all_finite, cast_can_overflow

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_special_value_is_found_in_every_piece(dtype: torch.dtype) -> None:
    """NaN (either sign), ±inf at the first, a middle and the last element of a tensor of several pieces;
    the largest finite values, subnormals and -0 are finite."""
    n = 2 * FINITE_PIECE + 3  # the last piece is a short one
    info = torch.finfo(dtype)
    edge = torch.tensor([info.max, -info.max, info.tiny / 2, -0.0, info.tiny], dtype=dtype)
    base = torch.randn(n, dtype=torch.float64).to(dtype)
    base[:5] = edge
    assert all_finite(base) and bool(torch.isfinite(base).all())
    for value in (float("nan"), -float("nan"), float("inf"), -float("inf")):
        for at in (0, FINITE_PIECE + 7, n - 1):
            t = base.clone()
            t[at] = value
            assert not all_finite(t), (value, at)
            assert not all_finite(t.view(-1, 1).t()), "strided views are tested too"


def test_integers_and_empty_tensors_are_finite_and_float8_uses_the_plain_test() -> None:
    assert all_finite(torch.arange(10)) and all_finite(torch.empty(0, 4))
    fp8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2)
    assert not all_finite(fp8) and all_finite(fp8[:1])


@pytest.mark.parametrize(
    ("source", "target", "can"),
    [
        (torch.bfloat16, torch.bfloat16, False),
        (torch.bfloat16, torch.float32, False),
        (torch.float16, torch.bfloat16, False),
        (torch.float32, torch.float16, True),
        (torch.bfloat16, torch.float16, True),
        (torch.float32, torch.bfloat16, True),  # rounds to inf just under float32's max
        (torch.int64, torch.float16, True),
        (torch.float32, torch.int64, False),
    ],
)
def test_only_casts_that_narrow_the_range_can_overflow(source: torch.dtype, target: torch.dtype, can: bool) -> None:
    assert cast_can_overflow(source, target) is can
    if can and source.is_floating_point:  # and it does: the source's largest value becomes inf
        assert not all_finite(torch.tensor([torch.finfo(source).max], dtype=source).to(target))
