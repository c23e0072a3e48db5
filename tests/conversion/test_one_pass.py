"""`convert --method svd --calibration` walks the conversion's rooms once: one plan, one pass, no call back up.

The call trace (tests/conversion/trace.py) of the conversion of a tiny llama: the planner runs once (the pass and
the writer use that plan), each layer's merge is computed once, and no room calls into a room that imports it
(the pass drives its visitors; none of them drives the pass or the planner)."""

from __future__ import annotations

from pathlib import Path

import uptrain_gqa
from tests.conversion.trace import calls, conversion_imports, trace, upward_calls, walk
from uptrain_gqa.cli import main
from uptrain_gqa.synthetic import save_tiny_llama

RANDOM = ["--calibration", "random", "--calibration-tokens", "256"]


def traced(tmp_path: Path, *extra: str):
    src = save_tiny_llama(tmp_path / "src", shard=None)
    args = ["convert", str(src), str(tmp_path / "out"), "--num-kv-heads", "2", "--method", "svd", *RANDOM, "--quiet"]
    code: list[int] = []
    root = trace(lambda: code.append(main([*args, *extra])))
    assert code == [0]
    return root


def test_a_calibrated_conversion_plans_once_and_never_calls_back_up(tmp_path: Path) -> None:
    root = traced(tmp_path)
    assert calls(root, "layer_steps") == 1  # the plan, made once (its layers' calls fold into one)
    assert upward_calls(root, conversion_imports(Path(uptrain_gqa.__file__).parent / "conversion")) == set()
    stages = walk(root, stages_only=True)
    assert {"calibrate", "layered", "walk", "layer_merge", "joint"} <= set(stages.entered)


def test_a_layer_whose_refinement_is_dropped_is_not_merged_again(tmp_path: Path) -> None:
    """lr 1.0 makes every layer worse on held-out windows: the closed form is written, as computed in the pass."""
    root = traced(tmp_path, "--refine-steps", "1", "--refine-lr", "1.0")
    assert calls(root, "JointLayer.compute") == 1  # once per layer, the layers' identical walks folded
