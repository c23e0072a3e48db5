"""What `uptrain convert` writes runs in llama.cpp: llama.cpp's own converter makes a GGUF of a GQA and of an
MQA conversion, and llama-cpp-python reads G KV heads from it and computes what transformers computes.

Slow (`make test-all`, which installs the `llamacpp` extra): llama-cpp-python compiles llama.cpp once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

LOGPROB_TOLERANCE = 1e-4
"""Both engines compute in float32 (f32 weights and KV cache); llama.cpp's kernels sum in other orders (seen: 3e-6)."""


@pytest.fixture(scope="module")
def tree() -> Path:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: `make test-all` installs it (pip install -e '.[llamacpp]')")
    from scripts.llama_cpp_parity import llama_cpp_tree

    return llama_cpp_tree()


@pytest.fixture(scope="module")
def source(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MHA Llama (8 KV heads) with Llama-2's tokenizer, which llama.cpp's converter knows."""
    from transformers import AutoTokenizer

    from uptrain_gqa.synthetic import save_tiny_llama

    folder = tmp_path_factory.mktemp("llama-cpp") / "src"
    vocab = tree / "models" / "ggml-vocab-llama-spm.gguf"
    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    save_tiny_llama(folder, shard=None, vocab_size=len(tokenizer), pad_token_id=None)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("groups", [4, 1], ids=["GQA-4", "MQA"])
def test_llama_cpp_runs_the_conversion_as_transformers_does(run_cli, tree: Path, source: Path, groups: int) -> None:
    from scripts.llama_cpp_parity import compare, to_gguf

    out = source.parent / f"g{groups}"
    code, _, err = run_cli("convert", source, out, "--num-kv-heads", groups, "--quiet")
    assert code == 0, err
    gguf = to_gguf(out, source.parent / f"g{groups}.gguf", tree)

    ids = torch.randint(3, 32000, (48,), generator=torch.Generator().manual_seed(groups)).tolist()
    figures = compare(out, gguf, ids, new_tokens=12)

    assert figures["kv_heads_config"] == figures["kv_heads_gguf"] == groups
    assert figures["max_abs_logprob_diff"] < LOGPROB_TOLERANCE, figures
    assert figures["argmax_agreement"] == 1.0
    assert figures["greedy_llama_cpp"] == figures["greedy_transformers"]
    assert figures["perplexity_llama_cpp"] == pytest.approx(figures["perplexity_transformers"], rel=1e-4)
