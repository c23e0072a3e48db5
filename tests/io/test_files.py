"""The streaming shard writer and the lazy reader, checked against the safetensors library."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.io.tensors import SAFE_INDEX, TensorSpec
from uptrain_gqa.io.writer import ShardedWriter
from uptrain_gqa.units import format_bytes, parse_size


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 7, generator=g).to(torch.bfloat16),  # odd byte count
        "b.weight": torch.randn(16, 16, generator=g),
        "c.bias": torch.randn(5, generator=g).to(torch.float16),
        "d.scale": torch.tensor(3.5),  # 0-dim
        "e.empty": torch.zeros(0, 4),
        "f.ids": torch.arange(10, dtype=torch.int64),
        "g.mask": torch.tensor([True, False, True]),
        "h.big": torch.randn(64, 64, generator=g),  # alone above the cap
    }


def write_all(folder: Path, tensors: dict[str, torch.Tensor], cap: int) -> ShardedWriter:
    writer = ShardedWriter(folder, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], cap)
    for spec in writer.order:
        writer.write(spec.name, tensors[spec.name])
    writer.finish()
    return writer


def test_sharded_output_round_trips_through_safetensors(tmp_path: Path) -> None:
    tensors = sample()
    cap = 2000
    writer = write_all(tmp_path, tensors, cap)
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_file(tmp_path / file)
        big = any(t.numel() * t.element_size() > cap for t in part.values())
        assert big or sum(t.numel() * t.element_size() for t in part.values()) <= cap
        with safe_open(tmp_path / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        loaded |= part
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    assert writer.bytes_written == index["metadata"]["total_size"]


def test_tensors_start_aligned_to_their_element_size(tmp_path: Path) -> None:
    write_all(tmp_path, sample(), cap=10**9)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    for name, entry in header.items():
        if name != "__metadata__":
            start = entry["data_offsets"][0]
            itemsize = {"F32": 4, "I64": 8, "BF16": 2, "F16": 2, "BOOL": 1}[entry["dtype"]]
            assert start % itemsize == 0, name


def test_one_shard_is_written_without_index(tmp_path: Path) -> None:
    write_all(tmp_path, sample(), cap=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_writer_rejects_tensors_out_of_plan(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [TensorSpec("x", torch.float32, (2, 3))], 100)
    with pytest.raises(RuntimeError, match="expected x"):
        writer.write("y", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="expected x"):
        writer.write("x", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="got 3 rows of x"):
        writer.write("x", [torch.zeros(2, 3), torch.zeros(1, 3)])
    with pytest.raises(RuntimeError, match="0 of 1"):
        writer.finish()


def test_chunks_round_trip(tmp_path: Path) -> None:
    """Copied tensors stream through in row chunks; the bytes written are the same."""
    tensors = sample()
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], 3000)
    for spec in writer.order:
        pieces = list(reader.read_chunks(spec.name, chunk_bytes=100))
        if spec.nbytes > 100 and spec.shape[0] > 1:
            assert len(pieces) > 1 and all(p.nbytes <= max(100, p[0].nbytes) for p in pieces)
        assert torch.equal(torch.cat(pieces) if pieces[0].dim() else pieces[0], tensors[spec.name])
        writer.write(spec.name, iter(pieces))
    writer.finish()
    assert CheckpointReader(out).tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(CheckpointReader(out).read(name), t)


def test_reader_matches_safetensors_for_single_and_sharded(tmp_path: Path) -> None:
    tensors = sample()
    save_file(tensors, tmp_path / "model.safetensors")
    single = CheckpointReader(tmp_path)
    sharded_dir = tmp_path / "sharded"
    sharded_dir.mkdir()
    write_all(sharded_dir, tensors, cap=1500)
    sharded = CheckpointReader(sharded_dir)
    for reader in (single, sharded):
        assert reader.tensors.keys() == tensors.keys()
        assert reader.num_parameters == sum(t.numel() for t in tensors.values())
        for name, t in tensors.items():
            info = reader.tensors[name]
            assert (info.dtype, info.shape) == (t.dtype, tuple(t.shape))
            assert torch.equal(reader.read(name), t)


def test_reader_uses_only_indexed_tensors(tmp_path: Path) -> None:
    save_file({"kept": torch.ones(2), "stray": torch.zeros(2)}, tmp_path / "shard.safetensors")
    (tmp_path / SAFE_INDEX).write_text(json.dumps({"weight_map": {"kept": "shard.safetensors"}}))
    assert list(CheckpointReader(tmp_path).tensors) == ["kept"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5 GB", 15 * 10**8), ("1000", 1000), (7, 7)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 parsecs", "0", "-3MB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UptrainError):
        parse_size(text)


def test_format_bytes_names_its_unit() -> None:
    assert format_bytes(1_340_000_000) == "1.34 GB"
    assert format_bytes(2**30, binary=True) == "1.00 GiB"
    assert format_bytes(512) == "512 B"


def test_a_shard_truncated_after_opening_fails_in_one_line(tmp_path: Path) -> None:
    """Bytes are read at the header's offsets with plain reads: a file cut short under the reader is
    reported, never returned as a half-filled tensor."""
    tensors = sample()
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    last = max(reader.tensors.values(), key=lambda info: info.offset + info.nbytes)
    os.truncate(tmp_path / "model.safetensors", last.offset + last.nbytes - 1)
    with pytest.raises(UptrainError, match=f"model.safetensors ended inside tensor {last.name}"):
        reader.read(last.name)
    assert last.shape[0] > 1  # and in row chunks (memory maps: reading past the end would crash, not raise)
    with pytest.raises(UptrainError, match=f"model.safetensors ended inside tensor {last.name}"):
        list(reader.read_chunks(last.name, chunk_bytes=1))


@pytest.mark.parametrize("way", ["copy_file_range", "sendfile", "read", "copy_file_range refused (EXDEV)"])
def test_tensors_copied_by_the_kernel_equal_tensors_written(tmp_path: Path, monkeypatch, way: str) -> None:
    """`copy` (file to file, for tensors kept as stored) and `write` (tensors in memory) give the same shards,
    by each kernel copy and by the fallback when one is refused (another file system, another OS)."""
    import errno

    from uptrain_gqa.io import writer as writerlib

    tensors = sample()
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    if way.endswith("(EXDEV)"):

        def refused(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(writerlib.os, "copy_file_range", refused)
    monkeypatch.setattr(writerlib, "_COPY", way.split()[0])
    for folder, copied in (("written", False), ("copied", True)):
        (tmp_path / folder).mkdir()
        writer = ShardedWriter(tmp_path / folder, specs, 1500)
        for spec in writer.order:
            where = reader.byte_range(spec.name)
            writer.copy(spec.name, *where) if copied else writer.write(spec.name, reader.read(spec.name))
        writer.finish()
    if way.endswith("(EXDEV)"):
        assert writerlib._COPY == "sendfile"
    for shard in sorted((tmp_path / "written").iterdir()):
        assert (tmp_path / "copied" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    with pytest.raises(RuntimeError, match="expected"):
        ShardedWriter(tmp_path / "copied", specs, 1500).copy("not planned", tmp_path / "model.safetensors", 0, 4)
