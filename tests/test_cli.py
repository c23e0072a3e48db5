"""The command line: help, version, inspect, and the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, GPT2Config

from uptrain_gqa import __version__
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.synthetic import save_tiny_llama


def test_version(run_cli) -> None:
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"uptrain {__version__}"


@pytest.mark.integration
def test_version_answers_without_importing_torch() -> None:
    """`uptrain --version` is instant: it imports neither torch nor transformers (a fresh process)."""
    code = "import sys; from uptrain_gqa.cli import main; main(['--version']); print(sorted(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    version, modules = proc.stdout.split("\n", 1)
    assert version == f"uptrain {__version__}"
    assert "'torch'" not in modules and "'transformers'" not in modules


def test_help_lists_commands(run_cli) -> None:
    code, out, _ = run_cli("--help")
    assert code == 0 and "convert" in out and "inspect" in out


@pytest.mark.parametrize(
    "option",
    [
        "--num-kv-heads",
        "--method {mean,first,random,svd}",
        "--grouping {contiguous,similarity}",
        "--dtype {auto,bfloat16,float16,float32}",
        "--max-shard-size",
        "--overwrite",
        "--seed",
        "--revision",
        "--allow-pickle",
        "--quiet",
    ],
)
def test_convert_help_explains_every_option(run_cli, option: str) -> None:
    code, out, _ = run_cli("convert", "--help")
    assert code == 0
    flag = option.split()[0]
    help_line = out[out.index(option, out.index("options:")) :].split("\n  --")[0]
    words = help_line.replace(option, "").split()
    assert len(words) >= 4, f"{flag} needs an explanation, got: {help_line!r}"


def test_no_command_prints_help(run_cli) -> None:
    code, _, err = run_cli()
    assert code == 2 and "convert" in err


def test_inspect_describes_heads_cache_and_valid_g(run_cli, llama: Path) -> None:
    code, out, err = run_cli("inspect", llama)
    assert code == 0, err
    assert "llama (LlamaForCausalLM)" in out
    assert "KV heads         8 (MHA)" in out
    assert "1,024 bytes/token" in out  # 2 · 2 layers · 8 heads · 8 dims · 4 bytes
    lines = out[out.index("valid --num-kv-heads") :].splitlines()[2:]
    assert [int(line.split()[0]) for line in lines] == [4, 2, 1]
    assert "MQA" in lines[-1] and "8x smaller" in lines[-1]


def test_inspect_json_and_loads_no_weights(run_cli, llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reading(self, name):
        raise AssertionError("inspect must not read tensor data")

    monkeypatch.setattr(CheckpointReader, "read", no_reading)
    code, out, err = run_cli("inspect", llama, "--json")
    assert code == 0, err
    info = json.loads(out)
    model = AutoModelForCausalLM.from_pretrained(llama)
    assert info["parameters"] == model.num_parameters()
    assert (info["layers"], info["num_attention_heads"], info["num_kv_heads"], info["head_dim"]) == (2, 8, 8, 8)
    assert info["dtype"] == "float32"
    assert [v["num_kv_heads"] for v in info["valid_num_kv_heads"]] == [1, 2, 4]
    assert info["kv_cache_bytes_per_token"] == 2 * 2 * 8 * 8 * 4


def test_inspect_gqa_source_and_a_converted_one(run_cli, tmp_path: Path) -> None:
    src = save_tiny_llama(tmp_path / "gqa", num_key_value_heads=4)
    assert run_cli("convert", src, tmp_path / "mqa", "--num-kv-heads", "1", "--quiet")[0] == 0
    code, out, _ = run_cli("inspect", tmp_path / "mqa")
    assert code == 0
    assert "1 (MQA)" in out and "already MQA" in out and "converted by" in out


def test_inspect_says_why_a_family_cannot_be_converted(run_cli, tmp_path: Path) -> None:
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    code, out, _ = run_cli("inspect", tmp_path / "gpt2")
    assert code == 0
    assert "not convertible" in out and "no key/value-head setting" in out


@pytest.mark.integration
@pytest.mark.slow  # a fresh interpreter (~4 s); the installed wheel's `uptrain` runs in tests/test_packaging.py
def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed `uptrain` entry point (or `python -m uptrain_gqa`) converts and exits 0."""
    src = save_tiny_llama(tmp_path / "src")
    exe = [shutil.which("uptrain")] if shutil.which("uptrain") else [sys.executable, "-m", "uptrain_gqa"]
    proc = subprocess.run(
        [*exe, "convert", str(src), str(tmp_path / "out"), "--num-kv-heads", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "8 -> 2 KV heads" in proc.stdout and "4.0x smaller" in proc.stdout
    assert "B/s" in proc.stderr or "%" in proc.stderr  # the progress bar goes to stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_key_value_heads == 2


def test_config_key_help_shows_the_allowed_values(capsys) -> None:
    from uptrain_gqa.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--optim.schedule='cosine' [cosine | linear | constant]" in out
    assert "--model.save_dtype='auto' [auto | float32 | bfloat16 | float16]" in out


@pytest.mark.integration
def test_a_closed_stdout_ends_quietly(llama: Path) -> None:
    """`uptrain inspect MODEL | head -0`: the reader left before anything was printed; no 'Broken pipe' error."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uptrain_gqa", "inspect", str(llama)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # before the command prints: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize(("name", "value"), [("WORLD_SIZE", "abc"), ("RANK", "-1"), ("PMI_SIZE", "2.5")])
def test_malformed_launcher_variables_are_refused_before_any_work(
    run_cli, llama: Path, monkeypatch, name, value
) -> None:
    monkeypatch.setenv(name, value)
    out = llama.parent / "out"
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--quiet")
    assert code == 1 and err.strip() == (
        f"uptrain convert: error: {name}={value!r} is not a process count or rank; unset it, or let the launcher "
        "(torchrun, accelerate launch, srun) set it"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "value", "recorded"), [("WORLD_SIZE", "", 1), ("NNODES", "two", "two"), ("NNODES", "1:4", "1:4")]
)
def test_empty_or_free_form_launcher_variables_never_lose_a_conversion(
    run_cli, llama: Path, monkeypatch, name, value, recorded
) -> None:
    """An empty WORLD_SIZE is unset; NNODES is the user's (torchrun takes ranges like 1:4): recorded as given."""
    monkeypatch.setenv(name, value)
    out = llama.parent / "out"
    assert run_cli("convert", llama, out, "--num-kv-heads", "2", "--quiet")[0] == 0
    record = json.loads((out / "uptrain_conversion.json").read_text())["environment"]
    assert (record["machines"] if name == "NNODES" else record["processes"]) == recorded


def test_the_default_mean_pooling_says_what_svd_gains_and_how(run_cli, llama: Path, tmp_path: Path) -> None:
    """Mean pooling stays the default (the paper's start); one line names --method svd with the user's own paths."""
    out = tmp_path / "out dir"
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "--method svd" in line]
    assert len(notes) == 1 and f"uptrain convert {llama} '{out}' --num-kv-heads 2 --method svd" in notes[0]
    code, _, err = run_cli("convert", llama, tmp_path / "svd", "--num-kv-heads", "2", "--method", "svd",
                           "--calibration", "random", "--calibration-tokens", "256")  # fmt: skip
    assert code == 0 and "note:" not in err, err


def test_an_unknown_flag_names_the_command_and_the_closest_flag(run_cli, llama: Path) -> None:
    code, _, err = run_cli("inspect", llama, "--jsn")
    assert code == 2 and "uptrain inspect: error: unrecognized arguments: --jsn; did you mean --json?" in err
    code, _, err = run_cli("inspect", llama, "--zzzqq")
    assert code == 2 and "unrecognized arguments: --zzzqq; see uptrain inspect --help" in err


def test_json_alone_prints_only_the_result_for_every_command(run_cli, llama: Path, tmp_path: Path) -> None:
    """One convention: `--json` alone is the result as JSON on stdout, with no table beside it."""
    runs = {
        "inspect": ["inspect", llama],
        "env": ["env"],
        "plan": ["plan", llama, "--memory", "1GB"],
        "convert": ["convert", llama, tmp_path / "out", "--num-kv-heads", "2"],
    }
    for name, args in runs.items():
        code, out, err = run_cli(*args, "--json")
        assert code == 0, (name, err)
        assert isinstance(json.loads(out), dict), (name, out[:200])
    assert json.loads(run_cli("convert", llama, tmp_path / "again", "--num-kv-heads", "4", "--json")[1])[
        "num_kv_heads"] == 4  # fmt: skip


def test_json_to_a_file_never_replaces_a_link_and_streams_into_a_fifo(run_cli, llama: Path, tmp_path: Path) -> None:
    import os
    import threading

    target = tmp_path / "facts.json"
    code, out, _ = run_cli("inspect", llama, "--json", target)
    assert code == 0 and "valid --num-kv-heads" in out and json.loads(target.read_text())["layers"] == 2
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "link.json").symlink_to(victim)
    (tmp_path / ".facts.json.uptrain-tmp").symlink_to(victim)  # where a fixed temporary name used to be
    code, _, err = run_cli("inspect", llama, "--json", tmp_path / "link.json")
    assert code == 1 and "is a symlink; uptrain replaces only regular files" in err
    code, _, err = run_cli("inspect", llama, "--json", target)
    assert code == 0 and victim.read_text() == "keep me" and (tmp_path / "link.json").is_symlink()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, _, err = run_cli("inspect", llama, "--json", fifo)
    reader.join(timeout=60)
    assert code == 0 and json.loads(got[0])["layers"] == 2 and fifo.is_fifo(), err
