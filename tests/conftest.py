from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub (set before any HF import)

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from families import BASE
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils.logging import disable_progress_bar

torch.set_num_threads(2)
disable_progress_bar()


def save_llama(path: Path, shard: str | None = "30KB", seed: int = 0, **overrides) -> Path:
    """A tiny random MHA Llama (8 heads, head_dim 8, 2 layers) saved as a HF folder."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **overrides})).eval()
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A sharded tiny MHA Llama checkpoint in tmp_path/src."""
    return save_llama(tmp_path / "src")


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `uptrain ARGS...` in-process: (exit status, stdout, stderr)."""
    from uptrain.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what set-up printed
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
