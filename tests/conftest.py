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


# --- training fixtures: a tiny corpus with structure a 2-layer model can learn, and its tokenizer ---

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the king", "a bird", "the farmer", "our teacher"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "feeds", "meets", "calls"]
OBJECTS = ["the river", "a small house", "the red apple", "a green field", "the moon", "a quiet town"]
ENDINGS = ["today .", "at night .", "in the morning .", "again .", "."]
SPECIALS = ["<pad>", "<s>", "</s>", "[UNK]"]  # ids 0, 1, 2, 3 match the tiny configs


def corpus_words() -> list[str]:
    words = {w for group in (SUBJECTS, VERBS, OBJECTS, ENDINGS) for phrase in group for w in phrase.split()}
    return SPECIALS + sorted(words)


def write_corpus(path: Path, docs: int, seed: int = 0, fmt: str = "txt") -> Path:
    """`docs` short documents of grammatical sentences, as one .txt per document dir, .jsonl or .parquet."""
    import json
    import random

    rng = random.Random(seed)
    texts = [
        " ".join(
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(rng.randint(3, 8))
        )
        for _ in range(docs)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    else:
        path.mkdir(exist_ok=True)
        for i, t in enumerate(texts):
            (path / f"doc{i:04d}.txt").write_text(t + "\n")
    return path


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the corpus words that adds <s> and knows </s> as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(corpus_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
    ).save_pretrained(folder)


@pytest.fixture
def tiny_run(tmp_path: Path) -> dict:
    """A converted tiny Llama (MHA 8 -> GQA 2) with a tokenizer, a corpus, and configs/tiny-cpu.yaml
    pointed at them."""
    from uptrain.convert import convert

    src = save_llama(tmp_path / "mha", shard=None)
    save_tokenizer(src)
    convert(str(src), str(tmp_path / "gqa"), num_kv_heads=2, quiet=True)
    corpus = write_corpus(tmp_path / "corpus", docs=400)
    import yaml

    cfg = yaml.safe_load((Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml").read_text())
    cfg["model"]["path"] = str(tmp_path / "gqa")
    cfg["data"]["files"] = [str(corpus / "*.txt")]
    cfg["out"] = str(tmp_path / "run")
    return {"root": tmp_path, "source": src, "model": tmp_path / "gqa", "corpus": corpus, "config": cfg}
