"""Hub repo ids, through a Hugging Face cache prepared on disk (the tests run offline)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import AutoModelForCausalLM

from uptrain_gqa.io.folders import CONVERSION_RECORD
from uptrain_gqa.synthetic import save_tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache holding `acme/tiny-llama` at COMMIT, as `hf download` would leave it."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    save_tiny_llama(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    # huggingface_hub reads its environment at import: patch the constants it consults per call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_convert_a_hub_repo_id_records_repo_revision_and_commit(run_cli, hub_cache: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("convert", "acme/tiny-llama", tmp_path / "out", "--num-kv-heads", "2", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / CONVERSION_RECORD).read_text())
    assert report["source"] == {"repo_id": "acme/tiny-llama", "revision": "main", "commit": COMMIT}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_key_value_heads == 2


def test_revision_pins_a_commit(run_cli, hub_cache: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "convert", "acme/tiny-llama", tmp_path / "out", "--num-kv-heads", "4", "--revision", COMMIT, "--quiet"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "out" / CONVERSION_RECORD).read_text())["source"]["commit"] == COMMIT


def test_bad_g_fails_before_weights_are_fetched(run_cli, hub_cache: Path, tmp_path: Path) -> None:
    snapshot = hub_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT
    for shard in snapshot.glob("model-*.safetensors"):
        shard.unlink()  # were they needed, the (offline) download would fail with another message
    code, _, err = run_cli("convert", "acme/tiny-llama", tmp_path / "out", "--num-kv-heads", "3")
    assert code == 1 and "does not divide the source's 8 KV heads" in err


def test_inspect_a_cached_hub_repo(run_cli, hub_cache: Path) -> None:
    code, out, err = run_cli("inspect", "acme/tiny-llama", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["source"]["repo_id"] == "acme/tiny-llama" and info["num_kv_heads"] == 8


def test_revision_is_refused_for_local_folders(run_cli, llama: Path) -> None:
    code, _, err = run_cli("convert", llama, llama.parent / "out", "--num-kv-heads", "2", "--revision", "main")
    assert code == 1 and "--revision applies to Hub repo ids only" in err
