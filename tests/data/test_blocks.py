"""Training data: formats, packing, held-out validation, per-process reading, caching, streaming."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from uptrain_gqa.data import blocks as datalib
from uptrain_gqa.data import streams
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus


@pytest.fixture
def tokenizer(tmp_path: Path):
    save_word_tokenizer(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def stream_of(tokenizer, texts: list[str]) -> list[int]:
    """The token stream packing must cut: each document, then EOS."""
    ids = tokenizer(texts)["input_ids"]
    return list(itertools.chain.from_iterable([*d, tokenizer.eos_token_id] for d in ids))


def test_documents_are_packed_with_eos_between_them(tmp_path: Path, tokenizer) -> None:
    corpus = write_corpus(tmp_path / "c", docs=30)
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    cfg = DataConfig(files=[str(corpus / "*.txt")], seq_len=16, validation_blocks=2)
    blocks = datalib.pack_dataset(datalib.load_documents(cfg), tokenizer, cfg)
    rows = blocks[:]["input_ids"]
    assert rows.shape[1] == 16 and blocks.features["input_ids"].feature.dtype == "int32"  # stored compactly
    expected = stream_of(tokenizer, texts)
    assert rows.reshape(-1).tolist() == expected[: rows.size]  # whole blocks, in document order
    assert len(expected) - rows.size < 16  # only the last partial block is dropped
    assert rows.reshape(-1).tolist().count(tokenizer.eos_token_id) == expected[: rows.size].count(2)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet(tmp_path: Path, tokenizer, fmt: str) -> None:
    path = write_corpus(tmp_path / f"c.{fmt}", docs=30, fmt=fmt)
    txt = write_corpus(tmp_path / "txt", docs=30)
    cfg = DataConfig(files=[str(path)], seq_len=16)
    ref = DataConfig(files=[str(txt / "*.txt")], seq_len=16)
    a = datalib.pack_dataset(datalib.load_documents(cfg), tokenizer, cfg)[:]["input_ids"]
    b = datalib.pack_dataset(datalib.load_documents(ref), tokenizer, ref)[:]["input_ids"]
    assert np.array_equal(a, b)  # same documents, same blocks, whatever the format


def test_bad_data_sources(tmp_path: Path, tokenizer) -> None:
    jsonl = write_corpus(tmp_path / "c.jsonl", docs=5, fmt="jsonl")
    with pytest.raises(UptrainError, match=r"data\.files: no file matches"):
        datalib.load_documents(DataConfig(files=[str(tmp_path / "missing*.txt")]))
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(
        UptrainError, match=r"cannot read .*notes\.docx; use \.jsonl/\.json, \.parquet or plain-text files \(\.txt, "
    ):
        datalib.load_documents(DataConfig(files=[str(tmp_path / "notes.docx")]))
    cfg = DataConfig(files=[str(jsonl)], text_column="body")
    with pytest.raises(UptrainError, match="no column 'body' \\(columns: text, id\\)"):
        datalib.pack_dataset(datalib.load_documents(cfg), tokenizer, cfg)


def test_first_blocks_are_held_out_and_never_trained_on(tmp_path: Path, tokenizer) -> None:
    corpus = write_corpus(tmp_path / "c", docs=60)
    cfg = DataConfig(files=[str(corpus / "*.txt")], seq_len=16, validation_blocks=5)
    everything = datalib.pack_dataset(datalib.load_documents(cfg), tokenizer, cfg)[:]["input_ids"]
    data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    assert np.array_equal(data.validation[:]["input_ids"], everything[:5])
    assert np.array_equal(data.train[:]["input_ids"], everything[5:])  # training reads only the rest
    n_train = len(everything) - 5
    ids = np.concatenate([data.ids(i) for i in range(n_train // 4)])  # one epoch
    assert len(set(ids.tolist())) == len(ids) and ids.max() < n_train
    assert torch.equal(data.micro_batch(0), torch.from_numpy(everything[5:][data.ids(0)].astype(np.int64)))


def test_processes_read_disjoint_slices_of_the_same_global_batches() -> None:
    blocks, b = 50, 3
    one = datalib.BlockData(np.zeros(blocks), None, seed=7, micro_batch_size=2 * b, rank=0, world=1)
    ranks = [datalib.BlockData(np.zeros(blocks), None, seed=7, micro_batch_size=b, rank=r, world=2) for r in (0, 1)]
    for i in range(40):  # crosses several epochs
        r0, r1 = ranks[0].ids(i), ranks[1].ids(i)
        assert not set(r0) & set(r1) or blocks < 2 * b * (i + 1)  # disjoint within an epoch
        assert np.array_equal(np.concatenate([r0, r1]), one.ids(i))  # same global micro-batch


def test_each_epoch_is_a_seeded_permutation() -> None:
    order = datalib.BlockOrder(20, seed=3)
    epochs = [order.blocks(e * 20, 20) for e in range(3)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(datalib.BlockOrder(20, seed=3).blocks(20, 20), epochs[1])  # a function of position


def test_tokenized_blocks_are_cached(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "c", docs=40)
    cfg = DataConfig(files=[str(corpus / "*.txt")], seq_len=16, validation_blocks=2, cache_dir=str(tmp_path / "cache"))
    first = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=2)
    monkeypatch.setattr(
        datalib, "packer", lambda *a: lambda batch: pytest.fail("tokenized again, not read from the cache")
    )
    second = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=2)
    assert np.array_equal(first.train[:]["input_ids"], second.train[:]["input_ids"])
    assert first.train.cache_files and first.train.cache_files == second.train.cache_files


def test_several_tokenization_processes_give_the_same_blocks(tmp_path: Path, tokenizer) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", docs=2500, fmt="jsonl")
    one = DataConfig(files=[str(corpus)], seq_len=16, num_proc=1)
    two = DataConfig(files=[str(corpus)], seq_len=16, num_proc=2)
    a = datalib.pack_dataset(datalib.load_documents(one), tokenizer, one)[:]["input_ids"]
    b = datalib.pack_dataset(datalib.load_documents(two), tokenizer, two)[:]["input_ids"]
    assert np.array_equal(a, b)


def test_streaming_resumes_where_it_stopped(tmp_path: Path, tokenizer) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", docs=300, fmt="jsonl")
    cfg = DataConfig(files=[str(corpus)], seq_len=16, streaming=True, validation_blocks=2, shuffle_buffer=1)
    data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    assert data.streaming and data.validation.shape == (2, 16)
    first = [data.micro_batch(i) for i in range(3)]
    state = data.state_dict()
    rest = [data.micro_batch(i) for i in range(3, 6)]
    again = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    assert torch.equal(again.micro_batch(0), first[0])
    again.load_state_dict(state)
    assert all(torch.equal(again.micro_batch(i), r) for i, r in zip(range(3, 6), rest, strict=True))


def test_streaming_holds_out_documents_by_hash() -> None:
    texts = [f"document number {i}" for i in range(20_000)]
    held = [t for t in texts if streams._held_out(t)]
    assert 0.005 < len(held) / len(texts) < 0.015  # about 1 %
    assert held == [t for t in texts if streams._held_out(t)]  # deterministic


def mixture_config(tmp_path: Path, **data) -> DataConfig:
    """Two local sources 70/30 (different seeds: different documents)."""
    a, b = write_corpus(tmp_path / "a", docs=120, seed=1), write_corpus(tmp_path / "b", docs=120, seed=2)
    mixture = [
        {"label": "web", "weight": 0.7, "files": [str(a / "*.txt")]},
        {"label": "code", "weight": 0.3, "files": [str(b / "*.txt")]},
    ]
    from uptrain_gqa import config as configlib

    return configlib.from_dict(DataConfig, {"mixture": mixture, "seq_len": 16, "validation_blocks": 4, **data})


def test_a_mixture_interleaves_sources_by_weight_reproducibly(tmp_path: Path, tokenizer) -> None:
    cfg = mixture_config(tmp_path)
    data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    sources = data.train[:]["source"]
    assert abs((sources == 0).mean() - 0.7) < 0.05, (sources == 0).mean()  # the weights hold
    again = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    assert np.array_equal(again.train[:]["input_ids"], data.train[:]["input_ids"]), "the same order every time"
    assert [(label, len(r)) for label, r in data.parts] == [("web", 4), ("code", 4)]
    # every block of a source's validation range is held out of that source's training blocks
    held = {tuple(r) for r in data.validation[:]["input_ids"].tolist()}
    assert not held & {tuple(r) for r in data.train[:]["input_ids"].tolist()}


def test_a_tiny_weight_costs_no_more_than_a_large_one() -> None:
    """datasets' all_exhausted interleaving grew as 1/weight (weight 1e-5: 4x the memory and time of 0.3).
    One epoch of the mixture is as many blocks as the sources hold, whatever the weights; each source's
    share is its weight, over a few thousand blocks."""
    sizes = [3000, 2000]
    for weights in ([0.3, 0.7], [1e-5, 1 - 1e-5], [0.9, 0.1]):
        index = datalib.interleaving(["a", "b"], sizes, weights, seed=0)
        assert len(index) == sum(sizes)
        share = (index < sizes[0]).mean()
        assert abs(share - weights[0]) < 0.05 * max(weights[0], 0.01) + 0.005, (weights, share)
        assert np.array_equal(index, datalib.interleaving(["a", "b"], sizes, weights, seed=0)), "seeded"
    with pytest.raises(UptrainError, match=r"data.mixture\[b\] has no training blocks"):
        datalib.interleaving(["a", "b"], [5, 0], [0.5, 0.5], seed=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"files": ["x.txt"]}, "data.mixture replaces data.dataset/files"),
        ({"mixture": [{"label": "a", "weight": 0, "files": ["x"]}]}, "weight must be a positive number"),
        ({"mixture": [{"label": "a b", "weight": 1, "files": ["x"]}]}, "label must be a short name"),
        ({"mixture": [{"label": "a", "weight": 1}]}, "needs exactly one of dataset"),
        ({"mixture": [{"label": "a", "weight": 1, "files": ["x"]}] * 2}, "labels must differ"),
        (
            {"mixture": [{"label": a, "weight": 1e308, "files": ["x"]} for a in "ab"]},
            "weights are only relative: their sum must be finite",
        ),
    ],
)
def test_bad_mixtures_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(UptrainError, match=message):
        mixture_config(tmp_path, **change)


@pytest.mark.parametrize(
    ("rows", "shown"), [('{"text": "hi"}\n{"text": null}\n', "null"), ('{"text": 5}\n', "5 (int)")]
)
def test_documents_whose_text_is_not_text_are_refused_in_one_line(tmp_path: Path, tokenizer, rows, shown) -> None:
    """JSON null or a number in a .jsonl's text reached the tokenizer: a TypeError traceback in train,
    mixtures, calibration and eval. Packing (train, mixtures) and the token stream (calibration, eval)
    both refuse it, naming the value."""
    from uptrain_gqa.data.documents import token_stream

    path = tmp_path / "bad.jsonl"
    path.write_text(rows)
    cfg = DataConfig(files=[str(path)], seq_len=4)
    message = f"a document's 'text' is {shown}, not text"
    with pytest.raises(UptrainError, match=re.escape(message)):
        datalib.pack_dataset(datalib.load_documents(cfg), tokenizer, cfg)
    with pytest.raises(UptrainError, match=re.escape(message)):
        token_stream(cfg, tokenizer, 100)
    (tmp_path / "body.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UptrainError, match=re.escape("the data has no column 'text' (columns: body)")):
        token_stream(DataConfig(files=[str(tmp_path / "body.jsonl")]), tokenizer, 100)
