"""`make demo` end to end (slow: builds the 60 M-parameter demo source)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_converts_and_measures_the_cache(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path / "out"), "--tokens", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, MHA / GQA-2 / MQA
    assert "| MHA source | 8 | 16,384 | 16,384 |" in table[2]
    assert "| GQA-2 | 2 | 4,096 | 4,096 |" in table[3] and "4x smaller" in table[3]
    assert "| MQA | 1 | 2,048 | 2,048 |" in table[4] and "8x smaller" in table[4]
    assert (tmp_path / "out" / "gqa" / "model.safetensors.index.json").exists()  # sharded output
