"""A conversion that dies midway leaves no OUT (and, when it can clean up, no temp folder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests import programs
from uptrain_gqa.cli import main
from uptrain_gqa.io.writer import ShardedWriter


def leftovers(parent: Path, out: Path) -> list[Path]:
    return sorted(parent.glob(f".{out.name}.uptrain-*"))


def run_driver(sig: str, *args: Path | str) -> subprocess.CompletedProcess:
    """The real CLI in a child process, which sends itself a real signal once 3 tensors are written."""
    cmd = [sys.executable, *programs.module("signal_midway"), sig, "convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=programs.environment())


@pytest.mark.integration
def test_sigkill_midway_leaves_no_out(llama: Path) -> None:
    out = llama.parent / "out"
    proc = run_driver("SIGKILL", llama, out, "--num-kv-heads", "2", "--max-shard-size", "20KB")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    (tmp,) = leftovers(llama.parent, out)  # killed before it could clean: the partial work is hidden
    assert list(tmp.glob("model-*.safetensors")), "the kill happened after shards were written"


@pytest.mark.integration
def test_the_next_run_names_a_killed_runs_leftovers_and_overwrite_removes_them(llama: Path, run_cli) -> None:
    out = llama.parent / "out"
    assert run_driver("SIGKILL", llama, out, "--num-kv-heads", "2", "--max-shard-size", "20KB").returncode < 0
    (tmp,) = leftovers(llama.parent, out)
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--quiet")
    assert code == 0, err
    assert f"{tmp} was left by an interrupted run" in err and "ended without releasing its lock" in err
    assert tmp.exists(), "named, not deleted, without --overwrite"
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--quiet", "--overwrite")
    assert code == 0 and f"removed {tmp}" in err
    assert not leftovers(llama.parent, out)


@pytest.mark.integration
@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGHUP", marks=pytest.mark.slow)])  # the same path: ~5 s each
def test_sigterm_or_sighup_midway_cleans_up(llama: Path, sig: str) -> None:
    out = llama.parent / "out"
    proc = run_driver(sig, llama, out, "--num-kv-heads", "2", "--max-shard-size", "20KB")
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr
    assert "interrupted; nothing was written" in proc.stderr
    assert not out.exists() and not leftovers(llama.parent, out)
    assert not list(llama.parent.glob(".out.uptrain.lock")), "the lock is released"


@pytest.mark.integration
def test_sigint_midway_keeps_the_old_out(llama: Path, run_cli) -> None:
    out = llama.parent / "out"
    assert run_cli("convert", llama, out, "--num-kv-heads", "4", "--quiet")[0] == 0
    proc = run_driver("SIGINT", llama, out, "--num-kv-heads", "2", "--overwrite", "--max-shard-size", "20KB")
    assert proc.returncode == 130, proc.stderr
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 4
    assert not leftovers(llama.parent, out)


def test_failure_midway_removes_the_temp_folder(llama: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = llama.parent / "out"

    def failing(original):
        def write(self, *args):
            if self._next == 5:
                raise OSError(28, "No space left on device")
            original(self, *args)

        return write

    # tensors computed (write), and tensors copied as stored by the kernel (copy)
    monkeypatch.setattr(ShardedWriter, "write", failing(ShardedWriter.write))
    monkeypatch.setattr(ShardedWriter, "copy", failing(ShardedWriter.copy))
    assert main(["convert", str(llama), str(out), "--num-kv-heads", "2", "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == "uptrain convert: error: No space left on device"
    assert not out.exists() and not leftovers(llama.parent, out)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask_whatever_wrote_them(tmp_path: Path, umask: int) -> None:
    """transformers writes weights through private temporary files (0600): on a shared cluster nobody else
    could read a model uptrain trained. Files end as the umask says; executables stay executable."""
    from uptrain_gqa.io.folders import atomic_output_dir

    previous = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"weights")
            (tmp / "model.safetensors").chmod(0o600)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "sub" / "run.sh").chmod(0o700)
    finally:
        os.umask(previous)
    mode = lambda p: (tmp_path / "out" / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == 0o666 & ~umask and mode("sub/run.sh") == 0o777 & ~umask
