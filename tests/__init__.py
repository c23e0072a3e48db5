"""uptrain's test suite, one folder per room of the package (io, conversion, data, training, evaluation)."""

import socket
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
"""The repository: configs/ and docs/ the tests read."""


def free_port() -> int:
    """A TCP port nobody listens on, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_run(root: Path, **model: Any) -> dict:
    """A converted tiny Llama (MHA 8 -> GQA 2; `model` overrides its config) with a tokenizer, a
    corpus, and configs/tiny-cpu.yaml pointed at them, under `root`."""
    from uptrain_gqa import convert
    from uptrain_gqa.synthetic import save_tiny_llama, save_word_tokenizer, write_corpus

    src = save_tiny_llama(root / "mha", shard=None, **model)
    save_word_tokenizer(src)
    convert(src=str(src), out=str(root / "gqa"), num_kv_heads=2)
    corpus = write_corpus(root / "corpus", docs=400)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    cfg["model"]["path"] = str(root / "gqa")
    cfg["data"]["files"] = [str(corpus / "*.txt")]
    cfg["out"] = str(root / "run")
    return {"root": root, "source": src, "model": root / "gqa", "corpus": corpus, "config": cfg}
