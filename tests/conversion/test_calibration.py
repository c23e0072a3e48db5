"""`--calibration`: Σ of every attention input, computed one decoder layer at a time.

The reference is the plain way: load the whole model with transformers and hook every attention
module during a normal forward. The layer-by-layer pass must give the same Σ for every family
(including sliding-window and local/global-rotary layers, whose per-layer inputs differ), while
holding at most one layer's weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import accelerate.utils
import pytest
import torch
from transformers import AutoTokenizer

from tests.families import CASES, Case, build, load
from uptrain_gqa.conversion.calibrate import Calibration, Covariance
from uptrain_gqa.conversion.walk import calibration_pass
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import CONVERSION_RECORD, read_config
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import lookup
from uptrain_gqa.model.shape import shape_of_config_json
from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus


def reference_sigma(folder, text, tokens: int) -> dict[int, torch.Tensor]:
    """Σ̃ per layer from hooks on the whole model, run window by window on the calibration's windows (the text, and
    uptrain:broad mixed in)."""
    model = load(folder)
    seq = min(2048, model.config.max_position_embeddings)
    windows = Calibration(str(text), tokens).windows(AutoTokenizer.from_pretrained(folder), 0, seq)
    xs: dict[int, list[torch.Tensor]] = {}
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: xs.setdefault(i, []).append(kw.get("hidden_states", a[0] if a else None)[0]),
            with_kwargs=True,
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for _, ids in windows:
            model(ids[None], use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for i, chunks in xs.items():
        x = torch.cat(chunks).double()  # (N, hidden)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        out[i] = (x.T @ x / len(x)).float()
    return out


RENAMED = {"mixtral"}  # checkpoints whose expert weights transformers fuses at load time


def input_covariance(reader, arch, shape, calibration: Calibration) -> dict[int, torch.Tensor]:
    """{layer: Σ̃} from the pass with the Σ visitor alone."""
    store: dict[int, torch.Tensor] = {}
    calibration_pass(reader, arch, shape, calibration, [Covariance(shape.hidden, store)], quiet=True)
    return store


def calibrate(src, text, tokens: int) -> dict[int, torch.Tensor]:
    config = read_config(src)
    arch = lookup(config)
    shape = shape_of_config_json(config, arch.kv_heads_field)
    return input_covariance(CheckpointReader(src), arch, shape, Calibration(str(text), tokens))


def saved(case: Case, tmp_path):
    src = tmp_path / "src"
    build(case).save_pretrained(src)
    save_word_tokenizer(src)
    return src, write_corpus(tmp_path / "calib.jsonl", docs=30, fmt="jsonl")


# three layers of two kinds: a layer fed another kind's mask or rotary table shows in the next layer's Σ
MIXED = Case(
    "gemma3-mixed-layers",
    "gemma3_text",
    2,
    {"head_dim": 16, "sliding_window": 16, "num_hidden_layers": 3,
     "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
)  # fmt: skip


@pytest.mark.parametrize("case", [c for c in CASES if c.model_type not in RENAMED] + [MIXED], ids=lambda c: c.id)
def test_layer_by_layer_sigma_matches_the_whole_model(case: Case, tmp_path, monkeypatch) -> None:
    src, text = saved(case, tmp_path)
    tokens = 300  # windows of 128, 128 and 44 tokens (max_position_embeddings = 128)

    loaded: set[int] = set()  # decoder layers whose weights are in memory
    most = [0]
    real = accelerate.utils.set_module_tensor_to_device

    def tracked(module, name, device, *args, **kwargs):
        real(module, name, device, *args, **kwargs)
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer:
            (loaded.discard if str(device) == "meta" else loaded.add)(int(layer[1]))
            most[0] = max(most[0], len(loaded))

    monkeypatch.setattr(accelerate.utils, "set_module_tensor_to_device", tracked)
    store = calibrate(src, text, tokens)
    expected = reference_sigma(src, text, tokens)
    assert sorted(store) == sorted(expected) == list(range(case.config().num_hidden_layers))
    for i in expected:
        torch.testing.assert_close(store[i], expected[i], rtol=1e-4, atol=1e-4)
    assert most[0] == 1 and not loaded  # one layer at a time, none left behind


@pytest.mark.parametrize("case", [c for c in CASES if c.model_type in RENAMED], ids=lambda c: c.id)
def test_renamed_checkpoints_refuse_calibration(case: Case, tmp_path) -> None:
    src, text = saved(case, tmp_path)
    with pytest.raises(UptrainError, match="under other names; pass --calibration none"):
        calibrate(src, text, 300)


def test_calibration_refuses_bad_token_counts(llama, tmp_path) -> None:
    config = read_config(llama)
    arch = lookup(config)
    with pytest.raises(UptrainError, match="must be positive"):
        input_covariance(CheckpointReader(llama), arch, shape_of_config_json(config), Calibration("x.txt", 0))


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_calibration_text_is_refused_naming_the_file(run_cli, llama, tmp_path, content: str) -> None:
    """An empty or whitespace-only file gave 2 tokens and a merge worse than mean pooling, with exit 0."""
    save_word_tokenizer(llama)
    text = tmp_path / "empty.txt"
    text.write_text(content)
    out = tmp_path / "out"
    code, _, err = run_cli(
        "convert", llama, out, "--num-kv-heads", "2", "--method", "svd", "--calibration", text, "--quiet"
    )
    assert code == 1 and f"--calibration {text} gives" in err and "at least 64" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_svd_without_calibration_reads_broad_text_and_says_so(run_cli, llama, tmp_path) -> None:
    """The default for a source with a tokenizer: uptrain:broad, refined; the record, card and summary say which
    texts and how many tokens of each."""
    from uptrain_gqa.data import builtin

    save_word_tokenizer(llama)
    out = tmp_path / "out"
    code, stdout, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--method", "svd",
                                "--calibration-tokens", "600", "--refine-steps", "2")  # fmt: skip
    assert code == 0, err
    record = json.loads((out / CONVERSION_RECORD).read_text())
    calib = record["calibration"]
    assert calib["data"] == ["uptrain:broad"] and calib["chosen"] == "default" and calib["tokens_used"] == 600
    labels = [p.label for p in builtin.SETS["broad"]]
    assert [s["label"] for s in calib["sources"]] == labels and sum(s["tokens"] for s in calib["sources"]) == 600
    assert all(s["license"] for s in calib["sources"]) and record["refinement"]["steps"] == 2
    assert "calibrated on 600 tokens of text: docs, python" in stdout
    card = (out / "README.md").read_text()
    assert "- **Calibration:** the source read 600 tokens of text, one layer at a time" in card
    assert ": docs (`uptrain:broad.docs`, " in card and "- **Refinement:** each merged attention trained for 2" in card


def test_calibration_mix_shares_the_tokens_with_broad_text(run_cli, llama, tmp_path) -> None:
    save_word_tokenizer(llama)
    text = write_corpus(tmp_path / "own.jsonl", docs=60, fmt="jsonl")
    for mix, own in (("0", 800), ("0.75", 200)):
        out = tmp_path / f"out-{mix}"
        code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--method", "svd", "--calibration",
                               f"mine={text}", "--calibration-tokens", "800", "--calibration-mix", mix,
                               "--refine-steps", "0", "--quiet")  # fmt: skip
        assert code == 0, err
        sources = json.loads((out / CONVERSION_RECORD).read_text())["calibration"]["sources"]
        assert sources[0]["label"] == "mine" and sources[0]["tokens"] == own
        assert sum(s["tokens"] for s in sources) == 800 and len(sources) == (1 if mix == "0" else 7)
    short = write_corpus(tmp_path / "short.jsonl", docs=3, fmt="jsonl")  # fewer tokens than half of 800
    code, _, err = run_cli("convert", llama, tmp_path / "short", "--num-kv-heads", "2", "--method", "svd",
                           "--calibration", f"mine={short}", "--calibration-tokens", "800", "--refine-steps", "0",
                           "--quiet")  # fmt: skip
    assert code == 0, err
    calib = json.loads((tmp_path / "short" / CONVERSION_RECORD).read_text())["calibration"]
    assert calib["tokens_used"] == 800 and 64 <= calib["tokens_by_text"]["mine"] < 400  # the rest from broad text
    code, _, err = run_cli("convert", llama, tmp_path / "bad", "--num-kv-heads", "2", "--method", "svd",
                           "--calibration", str(text), "--calibration-mix", "1")  # fmt: skip
    assert code == 1 and "0 <= mix < 1" in err and not (tmp_path / "bad").exists()


def convert_refused(run_cli, llama, *args) -> str:
    """`uptrain convert LLAMA OUT --num-kv-heads 2 --method svd ARGS...` refused in one line, OUT not made: the line."""
    out = llama.parent / "out"
    code, stdout, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--method", "svd", *args, "--quiet")
    assert code == 1 and stdout == "" and not out.exists(), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("uptrain convert: error: "), err
    return err.strip()


def test_token_counts_beyond_memory_are_refused_before_allocating(run_cli, llama) -> None:
    """1e12 random tokens tried to allocate 8 TB of ids and ended in a traceback."""
    err = convert_refused(run_cli, llama, "--calibration", "random", "--calibration-tokens", "1000000000000")
    assert "--calibration-tokens 1,000,000,000,000 " in err and "at most " in err, err


def test_a_count_that_would_fill_memory_is_refused_with_the_most_that_fits(run_cli, llama, monkeypatch) -> None:
    """Allocatable, but the hidden states would fill RAM: refused, naming the largest count that fits."""
    from uptrain_gqa.conversion import calibrate

    shape = shape_of_config_json(read_config(llama))
    held = calibrate.Calibration("random", 1).bytes_per_token(shape, refining=True)
    most = 300
    monkeypatch.setattr(calibrate, "available_memory", lambda device: most * held + held // 2)  # ~300 KB free
    err = convert_refused(run_cli, llama, "--calibration", "random", "--calibration-tokens", str(most + 1),
                          "--refine-steps", "1")  # fmt: skip
    assert f"--calibration-tokens {most + 1:,} " in err and f"at most {most:,} fit" in err, err
    calibrate.Calibration("random", most + 1).check(shape)  # unrefined, attention inputs and outputs are not kept


@pytest.mark.parametrize("tokens", ["1", "63"])
@pytest.mark.parametrize("kind", ["random", "text"])
def test_a_calibration_smaller_than_the_hidden_size_is_refused_whatever_its_kind(
    run_cli, llama, tmp_path, tokens: str, kind: str
) -> None:
    """Σ has one direction per hidden unit (64 here): one random token was accepted, as were 63 of text."""
    save_word_tokenizer(llama)
    data = "random" if kind == "random" else str(write_corpus(tmp_path / "text.jsonl", docs=30, fmt="jsonl"))
    err = convert_refused(run_cli, llama, "--calibration", data, "--calibration-tokens", tokens)
    assert f"--calibration-tokens {tokens} is fewer than this model's hidden size (64)" in err, err


def test_a_subset_of_local_files_is_refused(run_cli, llama, tmp_path) -> None:
    """--calibration-subset names a Hub dataset's configuration; with local files it was dropped silently."""
    save_word_tokenizer(llama)
    text = write_corpus(tmp_path / "text.jsonl", docs=30, fmt="jsonl")
    err = convert_refused(run_cli, llama, "--calibration", text, "--calibration-subset", "en")
    assert "--calibration-subset applies to a Hub dataset" in err and str(text) in err, err
    err = convert_refused(run_cli, llama, "--calibration", text, "--calibration-split", "test")
    assert "--calibration-split applies to a Hub dataset" in err, err


@pytest.mark.parametrize("name", ["notes.txt", "rows.jsonl"])
def test_binary_calibration_text_is_refused_naming_the_file(run_cli, llama, tmp_path, name: str) -> None:
    """A gzip file named .txt ended in "DatasetGenerationError: An error occurred while generating the dataset"."""
    import gzip

    save_word_tokenizer(llama)
    good = write_corpus(tmp_path / "good", docs=5)
    binary = good / name
    binary.write_bytes(gzip.compress(b"w1 w2 w3 " * 500))
    err = convert_refused(run_cli, llama, "--calibration", binary)
    assert f"--calibration {binary} is not text (UTF-8)" in err, err


def test_a_folder_is_refused_with_the_glob_that_reads_it(run_cli, llama, tmp_path) -> None:
    """`--calibration DIR` said "no file matches"; it names the folder and the glob to pass instead."""
    save_word_tokenizer(llama)
    folder = write_corpus(tmp_path / "texts", docs=5)
    err = convert_refused(run_cli, llama, "--calibration", folder)
    assert f"--calibration {folder} is a folder" in err and f"'{folder}/*.txt'" in err, err


@pytest.mark.parametrize("args", [[], ["--refine-steps", "2"]], ids=["closed-form", "refined"])
@pytest.mark.parametrize("failure", ["safetensors", "OSError"])
def test_a_full_disk_while_spilling_is_the_same_line_as_at_the_final_write(
    run_cli, llama, monkeypatch, args: list[str], failure: str
) -> None:
    """Each layer's merged (or refined) attention tensors (layer-*) spill to disk during the calibration pass; a
    full disk there ended in a SafetensorError traceback. It reads as a full disk at the final write does
    (tests/io/test_atomic_output.py)."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full(tensors, filename, *a, **kw):
        if not Path(filename).name.startswith("layer-"):
            return real(tensors, filename, *a, **kw)
        if failure == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    err = convert_refused(run_cli, llama, "--calibration", "random", "--calibration-tokens", "256", *args)
    assert err == "uptrain convert: error: No space left on device"
    assert not [p for p in llama.parent.iterdir() if p.name != "src"]  # no temporary folder left behind
