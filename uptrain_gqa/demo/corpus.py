"""The demo's tokenizer, trained on the built-in Shakespeare corpus (`uptrain_gqa.data.corpora.SHAKESPEARE`)."""

from __future__ import annotations

from pathlib import Path


def train_tokenizer(files: list[Path], out: Path, vocab_size: int = 4096) -> Path:
    """A byte-level BPE tokenizer trained on `files`, saved as a Hugging Face tokenizer in `out`.
    One special token, <|endoftext|>, marks document boundaries (EOS, also used as BOS and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special, bos_token=special, pad_token=special)
    fast.save_pretrained(out)
    return out
