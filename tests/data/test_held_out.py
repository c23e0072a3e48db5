"""Validation is never trained on: files named both for training and for validation are trained without,
for one source, a stream and a mixture; the record and the card say how validation was made. And a
streamed file that disappears mid-run is named in one line."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from uptrain_gqa import config as configlib
from uptrain_gqa.data import blocks as datalib
from uptrain_gqa.data.config import DataConfig, data_sources, validation_description
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.synthetic import corpus_words, save_word_tokenizer

WORDS = corpus_words()[4:]  # ids 4.. (0-3: <pad> <s> </s> [UNK])
TRAIN_WORDS, VALIDATION_WORDS = WORDS[:19], WORDS[19:]  # disjoint: a block's words tell where it came from
FIRST_VALIDATION_ID = 4 + 19
SEQ_LEN = 17  # <s> + 15 words + </s>: one document is one block


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_word_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def write_docs(path: Path, words: list[str], docs: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=15))}) + "\n" for _ in range(docs)))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """data/a.jsonl and data/b.jsonl (training words), data/val.jsonl (validation words): `data/*.jsonl`
    names all three."""
    data = tmp_path / "data"
    write_docs(data / "a.jsonl", TRAIN_WORDS, 60, seed=1)
    write_docs(data / "b.jsonl", TRAIN_WORDS, 60, seed=2)
    write_docs(data / "val.jsonl", VALIDATION_WORDS, 20, seed=3)
    return data


def validation_words_in(rows) -> int:
    """How many rows hold a word only validation documents have."""
    return int((np.asarray(rows) >= FIRST_VALIDATION_ID).any(axis=1).sum())


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "uptrain_gqa"]


def test_a_glob_that_names_the_validation_files_trains_without_them(folder, tokenizer, caplog) -> None:
    cfg = DataConfig(files=[str(folder / "*.jsonl")], validation_files=[str(folder / "val.jsonl")], seq_len=SEQ_LEN)
    with caplog.at_level(logging.INFO, logger="uptrain_gqa"):
        data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    assert len(data.train) == 120 and validation_words_in(data.train[:]["input_ids"]) == 0  # a.jsonl and b.jsonl
    assert len(data.validation) == 20 and validation_words_in(data.validation[:]["input_ids"]) == 20
    assert "data.files: 1 file is also in data.validation_files; trained without it" in said(caplog)


def test_a_stream_that_names_the_validation_files_trains_without_them(folder, tokenizer, caplog) -> None:
    cfg = DataConfig(
        files=[str(folder / "*.jsonl")],
        validation_files=[str(folder / "val.jsonl")],
        seq_len=SEQ_LEN,
        streaming=True,
        validation_blocks=4,
        shuffle_buffer=1,
    )
    with caplog.at_level(logging.INFO, logger="uptrain_gqa"):
        data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    trained = np.concatenate([data.micro_batch(i).numpy() for i in range(60)])  # two epochs of a and b
    assert validation_words_in(trained) == 0
    assert validation_words_in(data.validation.numpy()) == 4
    assert "data.files: 1 file is also in data.validation_files; trained without it" in said(caplog)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_mixture_source_never_trains_on_any_source_s_validation_files(
    folder, tmp_path, tokenizer, caplog, streaming: bool
) -> None:
    """web's glob names code's validation file (and web's own): both are kept out of web's training."""
    other = write_docs(tmp_path / "code.jsonl", TRAIN_WORDS, 60, seed=4)
    web_val = write_docs(tmp_path / "data" / "web-val.jsonl", VALIDATION_WORDS, 20, seed=5)
    mixture = [
        {"label": "web", "weight": 0.5, "files": [str(folder / "*.jsonl")], "validation_files": [str(web_val)]},
        {"label": "code", "weight": 0.5, "files": [str(other)], "validation_files": [str(folder / "val.jsonl")]},
    ]
    fields = {"mixture": mixture, "seq_len": SEQ_LEN, "validation_blocks": 4, "streaming": streaming}
    cfg = configlib.from_dict(DataConfig, {**fields, "shuffle_buffer": 256})
    with caplog.at_level(logging.INFO, logger="uptrain_gqa"):
        data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    if streaming:
        trained = np.concatenate([data.micro_batch(i).numpy() for i in range(120)])  # over an epoch of each
    else:
        trained = data.train[:]["input_ids"]
        assert len(trained) == 180  # web: a and b; code: code.jsonl
    assert validation_words_in(trained) == 0
    assert (
        "data.mixture[web].files: 2 files are also in data.mixture[code].validation_files, "
        "data.mixture[web].validation_files; trained without them"
    ) in said(caplog)


def test_nothing_left_to_train_on_is_refused_in_one_line(folder) -> None:
    cfg = DataConfig(files=[str(folder / "val.jsonl")], validation_files=[str(folder / "*.jsonl")], seq_len=SEQ_LEN)
    with pytest.raises(UptrainError, match=r"^data.files: every file is also in data.validation_files; nothing") as e:
        datalib.load_documents(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("split", "validation_split"),
    [("train", "train"), ("train", "train[:5%]"), ("train[:10%]", " train[:10%] "), ("train+test", "test")],
)
def test_a_validation_split_that_is_the_training_split_is_refused(tokenizer, split: str, validation_split: str) -> None:
    cfg = DataConfig(dataset="acme/corpus", split=split, validation_split=validation_split)
    with pytest.raises(UptrainError, match=r"^data.validation_split .* is part of the training split data.split"):
        datalib.load_documents(cfg)
    mixture = [{"label": "web", "weight": 1, "dataset": "acme/corpus", "split": split,
                "validation_split": validation_split}]  # fmt: skip
    cfg = configlib.from_dict(DataConfig, {"mixture": mixture, "seq_len": SEQ_LEN})
    with pytest.raises(UptrainError, match=r"^data.mixture\[web\].validation_split .* training split") as e:
        datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=1)  # refused before the Hub is asked
    assert "\n" not in str(e.value)


def test_disjoint_slices_of_one_split_are_accepted() -> None:
    from uptrain_gqa.data.config import overlapping_splits

    assert not overlapping_splits("train[:90%]", "train[90%:]")
    assert not overlapping_splits("train", "validation")
    assert overlapping_splits("train", "TRAIN[:1%]")


def test_the_record_and_the_card_say_how_validation_was_made(folder, tmp_path) -> None:
    cfg = DataConfig(files=[str(folder / "*.jsonl")], validation_files=[str(folder / "val.jsonl")], seq_len=SEQ_LEN)
    (entry,) = data_sources(cfg)
    assert entry["count"] == 2  # a and b: what was trained on
    assert entry["bytes"] == sum((folder / n).stat().st_size for n in ("a.jsonl", "b.jsonl"))
    assert entry["validation"] == (
        "data.validation_files (1 file, at most 128 blocks), excluded from training; "
        "1 file of data.files left out as validation"
    )
    assert validation_description(DataConfig(files=["x"])) == "the first 128 blocks of the data, never trained on"
    streamed = validation_description(DataConfig(files=["x"], streaming=True))
    assert streamed == "documents held out by a hash of their text (about 1 %, at most 128 blocks), never trained on"
    hub = DataConfig(dataset="acme/corpus", validation_split="validation", validation_blocks=16)
    expected = "Hub split 'validation' (at most 16 blocks), apart from the training split 'train'"
    assert validation_description(hub) == expected
    mixture = [{"label": "web", "weight": 1, "files": ["x"]}, {"label": "code", "weight": 1, "files": ["y"]}]
    mixed = configlib.from_dict(DataConfig, {"mixture": mixture, "validation_blocks": 4})
    assert validation_description(mixed) == (
        "web: the first 4 blocks of the data, never trained on; code: the first 4 blocks of the data, never trained on"
    )

    from uptrain_gqa.training.config import TrainConfig
    from uptrain_gqa.training.export import training_summary

    train = configlib.from_dict(
        TrainConfig, {"model": {"path": "m"}, "budget": {"steps": 1}, "data": configlib.to_dict(cfg)}
    )
    assert training_summary(train, {})["validation"] == entry["validation"]


def test_a_mixture_s_hint_names_what_a_mixture_accepts(tmp_path, tokenizer) -> None:
    """Too few documents for the hash to hold any out: the hint named data.validation_split, which a mixture
    refuses; it names the source's own validation_files."""
    few = write_docs(tmp_path / "few.jsonl", TRAIN_WORDS, 3, seed=1)
    mixture = [{"label": "web", "weight": 1, "files": [str(few)]}]
    cfg = configlib.from_dict(DataConfig, {"mixture": mixture, "seq_len": SEQ_LEN, "streaming": True})
    with pytest.raises(UptrainError) as e:
        datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=1)
    message = str(e.value)
    assert "data.validation_split" not in message and "\n" not in message
    assert message.startswith("data.mixture[web]: found no held-out validation documents in the stream")
    assert "give data.mixture[web].validation_files" in message
    hub = configlib.from_dict(DataConfig, {"files": [str(few)], "seq_len": SEQ_LEN, "streaming": True})
    with pytest.raises(UptrainError, match=r"; give data.validation_files \(") as e:
        datalib.prepare(hub, tokenizer, seed=0, micro_batch_size=1)


def test_a_streamed_file_that_disappears_is_named_in_one_line(folder, tokenizer) -> None:
    cfg = DataConfig(
        files=[str(folder / "a.jsonl"), str(folder / "b.jsonl")],
        validation_files=[str(folder / "val.jsonl")],
        seq_len=SEQ_LEN,
        streaming=True,
        validation_blocks=2,
        shuffle_buffer=1,
    )
    data = datalib.prepare(cfg, tokenizer, seed=0, micro_batch_size=4)
    data.micro_batch(0)
    (folder / "a.jsonl").unlink()
    (folder / "b.jsonl").unlink()
    with pytest.raises(UptrainError) as e:
        for i in range(1, 100):
            data.micro_batch(i)
    message = str(e.value)
    assert re.fullmatch(
        r"the data file .*/data/[ab]\.jsonl disappeared while streaming; restore it, then continue the run "
        r"with `uptrain train \.\.\. --resume auto`",
        message,
    ), message


def test_a_streamed_mixture_file_that_disappears_names_its_source(folder, tokenizer) -> None:
    mixture = [{"label": "web", "weight": 1, "files": [str(folder / "a.jsonl"), str(folder / "b.jsonl")],
                "validation_files": [str(folder / "val.jsonl")]}]  # fmt: skip
    fields = {"mixture": mixture, "seq_len": SEQ_LEN, "streaming": True, "validation_blocks": 2}
    data = datalib.prepare(configlib.from_dict(DataConfig, fields), tokenizer, seed=0, micro_batch_size=4)
    data.micro_batch(0)
    (folder / "a.jsonl").unlink()
    (folder / "b.jsonl").unlink()
    with pytest.raises(UptrainError, match=r"^data.mixture\[web\]: the data file .*\.jsonl disappeared while"):
        for i in range(1, 100):
            data.micro_batch(i)


def tiny_config(tiny_run: dict, data: dict) -> Path:
    import yaml

    cfg = {**tiny_run["config"], "data": data, "budget": {"steps": 2}, "checkpoint": {"every": 1, "keep": 1}}
    path = tiny_run["root"] / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # a converted model trained through the CLI (~5 s); the parts are tested above in well under 1 s
def test_a_run_says_it_trains_without_the_validation_files_and_records_how(run_cli, tiny_run: dict) -> None:
    data = tiny_run["root"] / "data"
    write_docs(data / "train.jsonl", TRAIN_WORDS, 80, seed=1)
    write_docs(data / "val.jsonl", VALIDATION_WORDS, 20, seed=2)
    fields = {"files": [str(data / "*.jsonl")], "validation_files": [str(data / "val.jsonl")], "seq_len": SEQ_LEN}
    code, _, err = run_cli("train", tiny_config(tiny_run, {**fields, "validation_blocks": 4}))
    assert code == 0, err
    assert "uptrain train: data.files: 1 file is also in data.validation_files; trained without it" in err
    run = Path(tiny_run["config"]["out"])
    (source,) = json.loads((run / "uptrain_run.json").read_text())["sessions"][0]["data"]
    how = "data.validation_files (1 file, at most 4 blocks), excluded from training; 1 file of data.files left out"
    assert source["count"] == 1 and source["validation"].startswith(how)
    assert f"- **validation:** {how}" in (run / "model" / "README.md").read_text()


@pytest.mark.slow  # a converted model trained through the CLI (~5 s); the stream reader is tested above at once
def test_a_streamed_file_deleted_mid_run_is_one_line(run_cli, tiny_run: dict, monkeypatch) -> None:
    from uptrain_gqa.data import streams

    data = tiny_run["root"] / "data"
    files = [write_docs(data / f"part{i}.jsonl", TRAIN_WORDS, 30, seed=i) for i in range(2)]
    held = write_docs(tiny_run["root"] / "val.jsonl", VALIDATION_WORDS, 4, seed=9)
    fields = {"files": [str(f) for f in files], "validation_files": [str(held)], "seq_len": SEQ_LEN}
    fields |= {"streaming": True, "shuffle_buffer": 1}
    original = streams.StreamData.micro_batch

    def micro_batch(self, micro_index: int):
        if micro_index == 1:  # after the first batches: the files are gone
            for f in files:
                f.unlink()
        return original(self, micro_index)

    monkeypatch.setattr(streams.StreamData, "micro_batch", micro_batch)
    cfg = tiny_config(tiny_run, {**fields, "validation_blocks": 1})
    code, _, err = run_cli("train", cfg, "--budget.steps=20", "--checkpoint.every=5")
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"uptrain train: error: the data file .*/part[01]\.jsonl disappeared while streaming; restore it, then "
        r"continue the run with `uptrain train \.\.\. --resume auto`",
        last,
    ), err
