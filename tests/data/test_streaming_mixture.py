"""Streamed mixtures: sources by weight in an order that depends on no process count, held-out blocks,
bitwise resume, on local files read through the same path as Hub datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from uptrain_gqa import config as configlib
from uptrain_gqa.data import blocks as datalib
from uptrain_gqa.data import streams
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.synthetic import corpus_words, save_word_tokenizer

WORDS = corpus_words()[4:]  # ids 4.. (0-3: <pad> <s> </s> [UNK])
VOCAB = {"web": WORDS[:19], "code": WORDS[19:]}  # disjoint: a block's words tell its source
FIRST_CODE_ID = 4 + 19
SEQ_LEN = 17  # <s> + 15 words + </s>: one document is exactly one block, so a leaked document is a leaked block


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_word_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def write_docs(path: Path, label: str, docs: int, seed: int) -> Path:
    """`docs` documents of 15 words of the source's own vocabulary, as .jsonl or .parquet."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(VOCAB[label]) for _ in range(15)) for _ in range(docs)]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    else:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, list[str]]:
    """web: one .jsonl (split by example over 2 processes); code: two .parquet files (split by file)
    and a held-out .parquet."""
    root = tmp_path_factory.mktemp("corpora")
    return {
        "web": [str(write_docs(root / "web.jsonl", "web", 1500, seed=1))],
        "code": [str(write_docs(root / f"code{i}.parquet", "code", 300, seed=2 + i)) for i in range(2)],
        "code_validation": [str(write_docs(root / "code-val.parquet", "code", 40, seed=9))],
    }


def config(corpora: dict, weights: tuple[float, float] = (0.7, 0.3), **data) -> DataConfig:
    mixture = [
        {"label": "web", "weight": weights[0], "files": corpora["web"]},  # held out by the hash of the text
        {
            "label": "code",
            "weight": weights[1],
            "files": corpora["code"],
            "validation_files": corpora["code_validation"],
        },
    ]
    fields = {"mixture": mixture, "streaming": True, "seq_len": SEQ_LEN, "validation_blocks": 4, "shuffle_buffer": 300}
    return configlib.from_dict(DataConfig, {**fields, **data})


def source_of(block: torch.Tensor) -> int:
    words = [t for t in block.tolist() if t > 3]
    assert words and (max(words) < FIRST_CODE_ID or min(words) >= FIRST_CODE_ID), block  # one source per block
    return int(words[0] >= FIRST_CODE_ID)


def test_the_weights_hold_over_a_few_thousand_blocks(corpora, tokenizer) -> None:
    for weights in ((0.7, 0.3), (0.9, 0.1)):
        data = datalib.prepare(config(corpora, weights), tokenizer, seed=0, micro_batch_size=8)
        assert isinstance(data, streams.StreamMixture) and data.streaming
        batches = [data.micro_batch(i) for i in range(500)]  # 4,000 blocks; web cycles over its documents
        read = np.array([source_of(block) for batch in batches for block in batch])
        assert np.array_equal(read, np.concatenate([data.source_ids(i) for i in range(500)]))  # the chosen source
        assert abs((read == 0).mean() - weights[0]) < 0.05, (weights, (read == 0).mean())
    assert data.sources[0].epoch >= 1, "web was read more than once"


def test_the_source_order_is_a_function_of_seed_and_position_alone() -> None:
    weights = [0.6, 0.3, 0.1, 1e-4]
    order = streams.SourceOrder(weights, seed=3)
    drawn = order.sources(0, 200_000)  # crosses many draws of SOURCE_DRAWS positions
    shares = np.bincount(drawn, minlength=4) / len(drawn)
    assert np.allclose(shares, weights, atol=0.01), shares
    assert 0 < (drawn == 3).sum() < 100, "a tiny weight still appears, about as often as its weight says"
    fresh = streams.SourceOrder(weights, seed=3)
    assert np.array_equal(fresh.sources(123_457, 5000), drawn[123_457:128_457]), "any position, read alone"
    assert not np.array_equal(streams.SourceOrder(weights, seed=4).sources(0, 1000), drawn[:1000]), "seeded"


def test_the_same_sources_on_a_rerun_and_with_one_or_two_processes(corpora, tokenizer) -> None:
    """Global micro-batch i is positions [i·P·b, (i+1)·P·b), process r reads its slice of b: the source of
    every position is the same with 1 process reading 2b as with 2 processes reading b each. The blocks
    themselves come from each process's own part of the source."""
    cfg, b = config(corpora), 3
    one = datalib.prepare(cfg, tokenizer, seed=5, micro_batch_size=2 * b)
    ranks = [datalib.prepare(cfg, tokenizer, seed=5, micro_batch_size=b, rank=r, world=2) for r in (0, 1)]
    one_read = [one.micro_batch(i) for i in range(200)]
    ranks_read = [[data.micro_batch(i) for i in range(200)] for data in ranks]
    for i in range(200):
        both = torch.cat([ranks_read[0][i], ranks_read[1][i]])
        assert [source_of(x) for x in both] == [source_of(x) for x in one_read[i]], i
    assert np.array_equal(np.concatenate([ranks[0].source_ids(i) for i in range(200)]), np.concatenate(
        [one.source_ids(i)[:b] for i in range(200)]))  # fmt: skip
    again = datalib.prepare(cfg, tokenizer, seed=5, micro_batch_size=b, rank=1, world=2)
    assert all(torch.equal(again.micro_batch(i), ranks_read[1][i]) for i in range(200)), "a rerun reads the same"
    other = datalib.prepare(cfg, tokenizer, seed=6, micro_batch_size=b, rank=1, world=2)
    assert not all(torch.equal(other.micro_batch(i), ranks_read[1][i]) for i in range(20)), (
        "another seed, another order"
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_is_bitwise_with_a_shuffle_buffer(corpora, tokenizer, rank: int) -> None:
    """Each of 2 processes: after k micro-batches, state_dict -> a fresh object -> load_state_dict reads
    the same next micro-batches as the uninterrupted one, with windows of 300 documents shuffled; k is
    at the start, inside a window's first and second batch of PACK_DOCS documents, and after an epoch."""
    cfg, total, ks = config(corpora), 320, (0, 37, 100, 150, 300)
    straight = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4, rank=rank, world=2)
    states, read = {}, []
    for i in range(total):
        if i in ks:
            states[i] = straight.state_dict()
        read.append(straight.micro_batch(i))
    web = {k: states[k]["sources"]["web"] for k in ks}  # ~2.8 web blocks per micro-batch, ~740 per epoch
    assert (web[37]["window"], web[37]["batch"], web[37]["start"]) == (0, 0, None), "inside the first batch"
    assert (web[100]["window"], web[100]["batch"]) == (0, 1), "inside the second"
    assert web[150]["window"] == 1 and web[150]["start"] is not None, "inside a later window"
    assert web[300]["epoch"] == 1, "after an epoch over the source"
    for k, state in states.items():
        resumed = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4, rank=rank, world=2)
        resumed.load_state_dict(state)
        for i in range(k, total):
            assert torch.equal(resumed.micro_batch(i), read[i]), (k, i)
    # the documents are shuffled: web's first blocks come from its first window, not in file order
    part = [doc for doc in documents(corpora["web"][0], tokenizer) if not streams._held_out(doc[0])][rank::2]
    first = [tuple(x) for batch in read[:20] for x, s in zip(batch.tolist(), batch, strict=True) if not source_of(s)]
    assert set(first) <= {tuple(ids) for _, ids in part[:300]}
    assert first != [tuple(ids) for _, ids in part[: len(first)]]


def test_validation_blocks_are_never_trained_on(corpora, tokenizer) -> None:
    """web holds out documents by a hash of their text, code has validation files; every validation
    block of both processes is absent from what they train on over more than an epoch of each source."""
    cfg = config(corpora)
    ranks = [datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=8, rank=r, world=2) for r in (0, 1)]
    for data in ranks:
        assert [(label, len(rows)) for label, rows in data.parts] == [("web", 2), ("code", 2)]  # 4 per source
        held = data.validation.tolist()
        assert [source_of(torch.tensor(x)) for x in held] == [0, 0, 1, 1]
    validation = {tuple(x) for data in ranks for x in data.validation.tolist()}
    assert len(validation) == 8
    trained = {tuple(x) for data in ranks for i in range(300) for x in data.micro_batch(i).tolist()}
    assert len(trained) > 1500  # most documents of both sources, each a block
    assert not validation & trained
    held_out = {tuple(ids) for text, ids in documents(corpora["web"][0], tokenizer) if streams._held_out(text)}
    assert {tuple(x) for data in ranks for x in data.validation.tolist()[:2]} <= held_out, "web's: held out by hash"


def documents(path: str, tokenizer) -> list[tuple[str, list[int]]]:
    """A .jsonl's documents in file order, each with its block (one document is one block)."""
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]
    return [(t, [*tokenizer(t)["input_ids"], tokenizer.eos_token_id]) for t in texts]


def test_validation_reports_per_source(corpora, tokenizer) -> None:
    data = datalib.prepare(config(corpora), tokenizer, seed=0, micro_batch_size=8)
    assert [(label, rows) for label, rows in data.parts] == [("web", range(0, 4)), ("code", range(4, 8))]
    rows = [(r, ids) for r, ids in data.validation_rows(3)]
    assert [r for r, _ in rows] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert torch.equal(torch.cat([ids for _, ids in rows]), data.validation)


def test_a_resume_with_other_processes_or_backwards_is_refused(corpora, tokenizer) -> None:
    cfg = config(corpora)
    two = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4, rank=1, world=2)
    two.micro_batch(0)
    one = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    with pytest.raises(UptrainError, match="process 1 of 2's, not process 0 of 1's; resume with 2 processes"):
        one.load_state_dict(two.state_dict())
    with pytest.raises(UptrainError, match="read forward only: micro-batch 0 asked after 0"):
        two.micro_batch(0)


def test_a_process_whose_part_holds_no_block_is_told_so(tmp_path: Path, corpora, tokenizer) -> None:
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "the cat"}) + "\n")  # 4 tokens: no block of 17
    mixture = [
        {"label": "web", "weight": 0.5, "files": corpora["web"]},
        {"label": "tiny", "weight": 0.5, "files": [str(short)], "validation_files": corpora["code_validation"]},
    ]
    cfg = configlib.from_dict(DataConfig, {"mixture": mixture, "streaming": True, "seq_len": SEQ_LEN})
    data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    with pytest.raises(UptrainError, match=r"data.mixture\[tiny\]: process 0's part of the stream holds no block"):
        data.micro_batch(0)


def test_a_restore_does_not_say_a_shuffle_buffer_is_refilled(tmp_path: Path, corpora, tokenizer) -> None:
    """datasets warns on a restore from .txt files that its shuffle buffer is refilled; a source's buffer
    here holds one document (the windows shuffle), so nothing is lost and nothing is said."""
    import logging

    folder = tmp_path / "web"
    folder.mkdir()
    for i, line in enumerate(Path(corpora["web"][0]).read_text().splitlines()[:700]):
        (folder / f"doc{i:04d}.txt").write_text(json.loads(line)["text"])
    cfg = config({**corpora, "web": [str(folder / "*.txt")]})
    data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=8)
    for i in range(100):
        data.micro_batch(i)
    state = data.state_dict()
    assert state["sources"]["web"]["window"] >= 1, "restored to a window after the first: datasets reloads a state"
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("datasets.iterable_dataset")
    logger.addHandler(handler)
    try:
        resumed = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=8)
        resumed.load_state_dict(state)
        resumed.micro_batch(100)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in said if "shuffle buffer" in m], said
