"""Benchmark `uptrain convert` against the naive way and against raw I/O.

Builds a synthetic sharded Llama-shaped bf16 MHA checkpoint for each size, then measures,
each in a fresh process: wall time and peak RSS of
  - uptrain:  `uptrain convert SRC OUT --num-kv-heads G` (streaming),
  - naive:    AutoModelForCausalLM.from_pretrained -> mean-pool K/V -> save_pretrained,
  - raw I/O:  copying the same shard bytes to new files (write() of 8 MiB slices of a memory map),
and prints one table with ratios measured in the same run.

Times are the best of --repeat interleaved, rotated runs (the median is shown too: I/O times on
shared or virtual disks vary a lot). Every run starts with the source in the page cache (it is
read again right before each run, since the kernel may reclaim idle cache pages), and ends with
os.sync(), so times run until the output is on disk and no run inherits another's pending
writes. Libraries are imported before the clock starts.

    python -m benchmarks.convert                      # 1 GB and 2.5 GB, 3 shards each (`make bench`)
    python -m benchmarks.convert --sizes 2 8 --shards 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB = 16, 128, 2048, 5632, 32000
METHODS = ("raw", "uptrain", "naive")
ROOT = Path(__file__).resolve().parent.parent


def layers_for(size_gb: float) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))


def make_checkpoint(folder: Path, layers: int, shards: int) -> int:
    """A Llama-shaped bf16 MHA checkpoint with random weights in `shards` files; returns its bytes."""
    import torch

    from uptrain_gqa.synthetic import llama_config, save_random_checkpoint

    config = llama_config(HIDDEN, layers, HEADS, intermediate=FFN, vocab=VOCAB)
    return save_random_checkpoint(config, folder, torch.bfloat16, shards)


# --- children: each measurement runs in its own process ------------------------------------


def child_uptrain(src: str, out: str, groups: int, shard: str) -> None:
    from uptrain_gqa import convert

    convert(src=src, out=out, num_kv_heads=groups, max_shard_size=shard)


def child_naive(src: str, out: str, groups: int, shard: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.data.float().unflatten(0, (HEADS, HEAD_DIM)).unflatten(0, (groups, -1)).mean(1)
            proj.weight = torch.nn.Parameter(w.flatten(0, 1).to(torch.bfloat16))
            proj.out_features = groups * HEAD_DIM
        layer.self_attn.config.num_key_value_heads = groups
    model.config.num_key_value_heads = groups
    model.save_pretrained(out, max_shard_size=shard)


def child_raw(src: str, out: str, groups: int, shard: str) -> None:
    """The fastest plain copy of the same bytes found on the test machine: write() 8 MiB slices
    of a read-only memory map (reading into a user buffer first was slower and erratic)."""
    import mmap

    Path(out).mkdir()
    for path in sorted(Path(src).glob("*.safetensors")):
        with (
            open(path, "rb") as fin,
            open(Path(out) / path.name, "wb", buffering=0) as fout,
            mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ) as m,
            memoryview(m) as view,
        ):
            for start in range(0, len(m), 8 * 2**20):
                fout.write(view[start : start + 8 * 2**20])


def peak_rss() -> int:
    """High-water RSS of this process in bytes. VmHWM resets on exec; ru_maxrss would carry
    over the parent's peak through fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(method: str, src: Path, out: Path, groups: int, shard: str) -> dict:
    # libraries are imported before the clock starts: the table compares the work, not imports
    code = (
        "import json, os, sys, time\n"
        "from benchmarks import convert as b\n"
        "import torch, safetensors, tqdm.auto, transformers, uptrain_gqa.commands.convert\n"
        "from transformers import CONFIG_MAPPING, AutoModelForCausalLM\n"
        "import transformers.models.llama.modeling_llama\n"
        "rss0 = b.peak_rss()\n"
        "t = time.perf_counter()\n"
        f"b.child_{method}({str(src)!r}, {str(out)!r}, {groups}, {shard!r})\n"
        "os.sync()\n"
        "t = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': t, 'peak_rss': b.peak_rss(), 'start_rss': rss0}))\n"
    )
    os.sync()  # flush the previous run's dirty pages so they do not slow this one
    warm(src)  # every method starts with the source in the page cache
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{method} failed:\n{proc.stderr}")
    shutil.rmtree(out)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.5], help="checkpoint sizes in GB")
    ap.add_argument("--shards", type=int, default=3, help="source shards per checkpoint")
    ap.add_argument("--num-kv-heads", type=int, default=4, help="G to convert to")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement; the fastest is kept")
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="uptrain-bench-", dir=args.workdir))
    rows = []
    try:
        for size in args.sizes:
            src = work / f"src-{size}"
            total = make_checkpoint(src, layers_for(size), args.shards)
            shard = f"{math.ceil(total / args.shards / 1e6)}MB"
            runs: dict[str, list[dict]] = {m: [] for m in METHODS}
            for i in range(args.repeat):  # interleaved and rotated, so no method always runs first
                for method in METHODS[i % 3 :] + METHODS[: i % 3]:
                    runs[method].append(run_child(method, src, work / "out", args.num_kv_heads, shard))
                    print(f"  {total / 1e9:.2f} GB {method:<8} {runs[method][-1]['seconds']:6.2f} s", file=sys.stderr)
            for method, rs in runs.items():
                best = min(rs, key=lambda r: r["seconds"])
                median = sorted(r["seconds"] for r in rs)[len(rs) // 2]
                peak = max(r["peak_rss"] for r in rs)
                rows.append({"size": total, "method": method, **best, "median_seconds": median, "peak_rss": peak})
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def report(rows: list[dict]) -> None:
    by = {(r["size"], r["method"]): r for r in rows}
    sizes = sorted({r["size"] for r in rows})
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\nmachine: {os.cpu_count()} CPUs, {ram:.0f} GiB RAM")
    print(
        "| checkpoint | method | best s | median s | peak RSS | RSS at start "
        "| time vs naive | RSS vs naive | time vs raw I/O |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        naive, raw = by[(size, "naive")], by[(size, "raw")]
        for method in ("raw", "uptrain", "naive"):
            r = by[(size, method)]
            print(
                f"| {size / 1e9:.2f} GB | {method} | {r['seconds']:.2f} | {r['median_seconds']:.2f} "
                f"| {r['peak_rss'] / 2**20:,.0f} MiB "
                f"| {r['start_rss'] / 2**20:,.0f} MiB | {r['seconds'] / naive['seconds']:.2f} "
                f"| {r['peak_rss'] / naive['peak_rss']:.2f} | {r['seconds'] / raw['seconds']:.2f} |"
            )
    up = [by[(s, "uptrain")] for s in sizes]
    print()
    for size, u in zip(sizes, up, strict=True):
        n, raw = by[(size, "naive")], by[(size, "raw")]
        print(
            f"{size / 1e9:.2f} GB: uptrain time = {u['seconds'] / n['seconds']:.2f} x naive (target <= 0.95), "
            f"{u['seconds'] / raw['seconds']:.2f} x raw I/O; peak RSS = {u['peak_rss'] / n['peak_rss']:.2f} x naive "
            "(target <= 0.15)"
        )
    if len(up) > 1:
        growth = (up[-1]["peak_rss"] - up[0]["peak_rss"]) / 2**20
        print(
            f"uptrain peak RSS from {sizes[0] / 1e9:.2f} to {sizes[-1] / 1e9:.2f} GB: {growth:+,.0f} MiB, "
            f"{up[-1]['peak_rss'] / up[0]['peak_rss']:.2f}x (target <= 1.3x: flat) while the model grew "
            f"{(sizes[-1] - sizes[0]) / 2**20:,.0f} MiB"
        )


if __name__ == "__main__":
    main()
