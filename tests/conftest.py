"""Fixtures shared by every room: a tiny sharded Llama, the CLI run in-process, a tiny training run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub (set before any HF import)

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from transformers.utils.logging import disable_progress_bar

from tests import ROOT
from uptrain.synthetic import save_tiny_llama, save_word_tokenizer, write_corpus

torch.set_num_threads(2)
disable_progress_bar()


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A sharded tiny MHA Llama checkpoint in tmp_path/src."""
    return save_tiny_llama(tmp_path / "src")


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


@pytest.fixture
def tiny_run(tmp_path: Path) -> dict:
    """A converted tiny Llama (MHA 8 -> GQA 2) with a tokenizer, a corpus, and configs/tiny-cpu.yaml
    pointed at them."""
    from uptrain import convert

    src = save_tiny_llama(tmp_path / "mha", shard=None)
    save_word_tokenizer(src)
    convert(str(src), str(tmp_path / "gqa"), num_kv_heads=2, quiet=True)
    corpus = write_corpus(tmp_path / "corpus", docs=400)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    cfg["model"]["path"] = str(tmp_path / "gqa")
    cfg["data"]["files"] = [str(corpus / "*.txt")]
    cfg["out"] = str(tmp_path / "run")
    return {"root": tmp_path, "source": src, "model": tmp_path / "gqa", "corpus": corpus, "config": cfg}
