"""Every command against damaged and wrong inputs, in a fresh process each, as a user types them (tests/reliability.py):
one line that says what is wrong, the documented exit status, no traceback, nothing of the user's replaced and no
output of a failed run left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import Case, cases, make_inputs, run_case

NAMES = [case.name for case in cases(Path("/listed-before-building"))]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    work = tmp_path_factory.mktemp("sweep")
    make_inputs(work)
    return {case.name: case for case in cases(work)}


def test_every_case_has_its_own_name() -> None:
    assert len(NAMES) == len(set(NAMES)) >= 80


@pytest.mark.slow  # ~90 fresh processes, ~4 min on 2 cores
@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_a_bad_input_gets_one_line_and_its_exit_status(sweep: dict[str, Case], name: str) -> None:
    result = run_case(sweep[name])
    assert not result["traceback"], result
    assert result["status"] == result["expected"], result
    assert result["one_line"], result
    assert not result["replaced_or_left"], result
