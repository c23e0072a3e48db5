"""Bad inputs: one clear line on stderr, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from uptrain_gqa.synthetic import save_tiny_llama


def refuse(run_cli, src: Path, out: Path, *extra: str, expect: str) -> str:
    """Run a conversion that must fail; check the exit, the one-line message and the folder."""
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
    code, stdout, stderr = run_cli("convert", src, out, *extra)
    lines = stderr.strip().splitlines()
    assert code == 1, stderr
    assert stdout == ""
    assert len(lines) == 1, stderr
    assert lines[0].startswith("uptrain convert: error: ")
    assert expect in lines[0], lines[0]
    assert not out.exists()
    if before is not None:  # no temp folder left behind either
        assert sorted(p.name for p in out.parent.iterdir()) == before
    return lines[0]


@pytest.mark.parametrize(
    ("g", "expect"),
    [
        ("3", "does not divide the source's 8 KV heads (valid: 1, 2, 4)"),
        ("8", "is not below the source's 8 KV heads"),
        ("16", "is not below the source's 8 KV heads"),
        ("0", "must be at least 1"),
        ("-2", "must be at least 1"),
    ],
)
def test_invalid_num_kv_heads(run_cli, llama: Path, g: str, expect: str) -> None:
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", g, expect=expect)


def test_num_kv_heads_must_divide_a_gqa_source(run_cli, tmp_path: Path) -> None:
    src = save_tiny_llama(tmp_path / "gqa", num_key_value_heads=4)
    refuse(run_cli, src, tmp_path / "out", "--num-kv-heads", "3", expect="(valid: 1, 2)")


def test_missing_shard(run_cli, llama: Path) -> None:
    shard = sorted(llama.glob("model-*.safetensors"))[1]
    shard.unlink()
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect=f"shard {shard.name} listed in")


def test_truncated_shard(run_cli, llama: Path) -> None:
    shard = sorted(llama.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect=f"shard {shard.name} is truncated")


def test_index_names_a_tensor_its_shard_lacks(run_cli, llama: Path) -> None:
    index_path = llama / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.self_attn.k_proj.weight"] = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = sorted(set(index["weight_map"].values()))[0]
    index_path.write_text(json.dumps(index))
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect="but that shard does not hold it")


def test_corrupt_index(run_cli, llama: Path) -> None:
    (llama / "model.safetensors.index.json").write_text("{not json")
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect="is not a valid index")


def test_no_weights_at_all(run_cli, llama: Path) -> None:
    for f in llama.glob("model*"):
        f.unlink()
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect="no weights in")


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        ({"num_key_value_heads": 4}, "model.layers.0.self_attn.k_proj.weight has shape [64, 64]"),
        ({"head_dim": 4}, "has shape [64, 64] but config.json implies 32 rows"),
        ({"num_hidden_layers": 1}, "config.json says 1 layers"),
        ({"num_hidden_layers": 3}, "has no tensor model.layers.2.self_attn.k_proj.weight"),
    ],
)
def test_tensor_shape_disagrees_with_config(run_cli, llama: Path, edit: dict, expect: str) -> None:
    cfg_path = llama / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **edit}))
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect=expect)


def _pickle_checkpoint(path: Path) -> Path:
    """The same tiny Llama saved the pre-safetensors way (pytorch_model.bin)."""
    save_tiny_llama(path, shard=None)
    model = AutoModelForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_pickle_checkpoints_are_refused_by_default(run_cli, tmp_path: Path) -> None:
    src = _pickle_checkpoint(tmp_path / "bin")
    refuse(run_cli, src, tmp_path / "out", "--num-kv-heads", "2", expect="--allow-pickle")


def test_pickle_checkpoints_convert_with_allow_pickle(run_cli, tmp_path: Path) -> None:
    src = _pickle_checkpoint(tmp_path / "bin")
    code, _, err = run_cli("convert", src, tmp_path / "out", "--num-kv-heads", "2", "--allow-pickle", "--quiet")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    source = AutoModelForCausalLM.from_pretrained(src)
    expected = source.model.layers[1].self_attn.v_proj.weight.unflatten(0, (2, 4, 8)).mean(1).flatten(0, 1)
    torch.testing.assert_close(model.model.layers[1].self_attn.v_proj.weight, expected, rtol=0, atol=1e-6)
    assert not list((tmp_path / "out").glob("*.bin")), "output is always safetensors"


def test_a_pickle_weights_only_refuses_is_explained_in_one_line(run_cli, tmp_path: Path) -> None:
    """A .bin holding a non-tensor object: convert said 'download it again' in 3 lines, eval gave a traceback."""
    import datetime

    src = _pickle_checkpoint(tmp_path / "bin")
    weights = torch.load(src / "pytorch_model.bin")
    torch.save({**weights, "saved_at": datetime.datetime(2020, 1, 1)}, src / "pytorch_model.bin")
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    for args in (
        ("convert", src, tmp_path / "out", "--num-kv-heads", "2", "--allow-pickle", "--quiet"),
        ("eval", src, f"--data.files=[{tmp_path / 't.txt'}]", "--no-speed", "--max-tokens", "32"),
    ):
        code, _, err = run_cli(*args)
        assert code == 1 and "holds objects other than tensors (datetime.datetime)" in err, err
        assert len(err.strip().splitlines()) == 1 and "download it again" not in err


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "gptj", "opt", "gpt_bigcode", "falcon"])
def test_families_without_a_kv_head_setting_are_refused(run_cli, tmp_path: Path, model_type: str) -> None:
    cfg = CONFIG_MAPPING[model_type](
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, n_embd=32, n_layer=1, n_head=4
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    msg = refuse(run_cli, tmp_path / "src", tmp_path / "out", "--num-kv-heads", "1", expect=f"'{model_type}'")
    assert "cannot be converted" in msg


def test_unknown_family_is_refused(run_cli, llama: Path) -> None:
    cfg_path = llama / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "mamba"}))
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect="'mamba' is not supported (supported:")


def test_quantized_checkpoints_are_refused(run_cli, llama: Path) -> None:
    cfg_path = llama / "config.json"
    cfg = {**json.loads(cfg_path.read_text()), "quantization_config": {"quant_method": "awq"}}
    cfg_path.write_text(json.dumps(cfg))
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect="quantized (awq)")


def test_out_under_a_file_is_not_writable(run_cli, llama: Path) -> None:
    blocker = llama.parent / "a-file"
    blocker.write_text("x")
    refuse(run_cli, llama, blocker / "out", "--num-kv-heads", "2", expect="is not a folder")


def test_out_in_a_read_only_folder(run_cli, llama: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere; use a folder the kernel refuses to create into
        out = Path("/proc/uptrain-test-out")
        code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2")
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert "cannot write into /proc" in err and not out.exists()
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refuse(run_cli, llama, ro / "out", "--num-kv-heads", "2", expect="cannot write into")
    finally:
        ro.chmod(0o700)


def test_existing_out_needs_overwrite(run_cli, llama: Path) -> None:
    out = llama.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2")
    assert code == 1 and "already exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what uptrain wrote: a user's folder is refused, a converted one replaced
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--overwrite", "--quiet")
    assert code == 1 and "was not written by uptrain" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_cli("convert", llama, out, "--num-kv-heads", "4", "--overwrite", "--quiet")[0] == 0  # empty: fine
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--overwrite", "--quiet")
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 2


def test_out_may_not_replace_the_source(run_cli, llama: Path) -> None:
    code, _, err = run_cli("convert", llama, llama, "--num-kv-heads", "2", "--overwrite")
    assert code == 1 and "would replace the source" in err
    code, _, err = run_cli("convert", llama, llama.parent, "--num-kv-heads", "2", "--overwrite")
    assert code == 1 and "would replace the source" in err
    assert (llama / "config.json").exists()


def test_missing_source_folder(run_cli, tmp_path: Path) -> None:
    refuse(run_cli, tmp_path / "nope", tmp_path / "out", "--num-kv-heads", "2", expect="no such folder")


def test_source_without_config(run_cli, llama: Path) -> None:
    (llama / "config.json").unlink()
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", expect="no config.json in")


def test_hub_repo_id_offline_fails_clearly(run_cli, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    out = tmp_path / "out"
    msg = refuse(run_cli, "uptrain-tests/not-a-local-folder", out, "--num-kv-heads", "2", expect="cannot be reached")
    assert "hf download uptrain-tests/not-a-local-folder" in msg


@pytest.mark.parametrize("size", ["5 parsecs", "0", "-1GB", "GB"])
def test_bad_shard_size(run_cli, llama: Path, size: str) -> None:
    refuse(run_cli, llama, llama.parent / "out", "--num-kv-heads", "2", f"--max-shard-size={size}", expect="size")


def test_missing_parent_folders_are_created_and_removed_on_failure(run_cli, llama: Path, tmp_path: Path) -> None:
    shard = sorted(llama.glob("model-*.safetensors"))[-1]
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama, corrupt)
    os.truncate(corrupt / shard.name, 10)
    out = tmp_path / "new" / "deeper" / "out"
    code, _, _ = run_cli("convert", corrupt, out, "--num-kv-heads", "2")
    assert code == 1 and not (tmp_path / "new").exists()
    code, _, err = run_cli("convert", llama, out, "--num-kv-heads", "2", "--quiet")
    assert code == 0, err
    assert (out / "config.json").exists()


def damaged(folder: Path, name: str, value: float) -> Path:
    """A tiny Llama whose tensor `name` holds `value` at [0, 0]."""
    from safetensors.torch import load_file, save_file

    save_tiny_llama(folder, shard=None)
    weights = load_file(folder / "model.safetensors")
    weights[name][0, 0] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("method", ["mean", "svd"])
def test_nan_in_an_attention_weight_stops_the_conversion(run_cli, tmp_path: Path, method: str) -> None:
    src = damaged(tmp_path / "src", "model.layers.0.self_attn.k_proj.weight", float("nan"))
    code, _, err = run_cli("convert", src, tmp_path / "out", "--num-kv-heads", "2", "--method", method, "--quiet")
    assert code == 1 and "k_proj.weight holds 1 NaN/inf values; the source checkpoint is damaged" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_nan_elsewhere_is_reported_and_a_joint_merge_refuses_cleanly(run_cli, tmp_path: Path) -> None:
    src = damaged(tmp_path / "src", "model.layers.0.mlp.up_proj.weight", float("nan"))
    code, _, err = run_cli("convert", src, tmp_path / "mean", "--num-kv-heads", "2", "--quiet")
    assert code == 0 and "warning: model.layers.0.mlp.up_proj.weight holds 1 NaN/inf values" in err
    code, _, err = run_cli("convert", src, tmp_path / "svd", "--num-kv-heads", "2", "--method", "svd", "--quiet")
    assert code == 1 and "the least-squares merge of layer" in err and "Traceback" not in err


def test_nan_in_the_last_chunk_of_a_large_chunked_tensor_is_found(run_cli, tmp_path: Path) -> None:
    """The embedding (140,000 x 64 float32, 35.8 MB) streams through in three CHUNK_BYTES chunks of several
    finiteness pieces each; its very last value is NaN."""
    from safetensors.torch import load_file, save_file

    from uptrain_gqa.conversion.checks import FINITE_PIECE
    from uptrain_gqa.io.reader import CHUNK_BYTES

    src = save_tiny_llama(tmp_path / "src", shard=None, vocab_size=140_000)
    weights = load_file(src / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    assert embed.numel() * embed.element_size() > CHUNK_BYTES and embed.numel() > 2 * FINITE_PIECE
    embed[-1, -1] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("convert", src, tmp_path / "out", "--num-kv-heads", "2", "--quiet")
    assert code == 0 and "warning: model.embed_tokens.weight holds 1 NaN/inf values" in err


def test_a_cast_that_overflows_is_refused(run_cli, tmp_path: Path) -> None:
    src = damaged(tmp_path / "src", "model.layers.0.mlp.up_proj.weight", 1e5)
    args = ("convert", src, tmp_path / "out", "--num-kv-heads", "2", "--quiet")
    code, _, err = run_cli(*args, "--dtype", "float16")
    assert code == 1 and "casting model.layers.0.mlp.up_proj.weight to float16 overflows" in err
    assert not (tmp_path / "out").exists()
    assert run_cli(*args, "--dtype", "bfloat16")[0] == 0  # bfloat16 holds 1e5
