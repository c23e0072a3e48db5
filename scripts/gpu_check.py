"""One prepared GPU check: training throughput, decode, FSDP2 over NCCL and calibration, in one command.

Each part runs one benchmark script in a process of its own with its own time limit, so a failure or a
timeout loses only that part; after every part, one JSON and one Markdown table are rewritten in --out
($OUT when set, else gpu-check-out/), with each part's status (ok / failed with the end of its output /
timed out with what it had measured / skipped and why), its figures and its command line, and whether
each target was met.

    make gpu-wheels        # here: .gpu-wheels/ holds uptrain and what the GPU machine lacks (datasets, ...)
    make gpu-check         # on the GPU machine (carry .gpu-wheels): installs them, then this script

On a GPU the parts have the shapes below (~1 B models, the Llama-2-7B width) and limits that add up to 9
minutes on one H100 / H200; without one, a dry run runs every part with tiny shapes in about a minute
(`--jobs 2`: two parts at a time, as the tests run it), and exits 0 only when every part passed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from scripts.gpu_check_report import markdown, targets

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "gpu-check-out"
GPU_BUDGET_S = 540  # the whole check on a GPU: 9 minutes, inside a 10-minute command on a 15-minute lease
MIN_PART_S = 10  # a part that would get less than this is skipped
VERSIONS = ["uptrain-gqa", "torch", "transformers", "accelerate", "datasets", "dill", "multiprocess",
            "huggingface_hub", "safetensors", "tokenizers", "pyarrow", "fsspec"]  # fmt: skip


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    module: str
    needs: tuple[str, ...]
    """modules it imports that the GPU machine may lack (uptrain train reads its data through datasets)"""
    gpu: tuple[str, ...]
    cpu: tuple[str, ...]
    gpu_limit_s: int
    cpu_limit_s: int = 240  # generous: a shared 2-core machine; the tiny parts take seconds of work


PARTS = [
    Part(
        "train", "training throughput", "scripts.bench_train", ("datasets",),
        gpu=("--hidden", "2048", "--layers", "16", "--heads", "16", "--seq-len", "2048", "--micro-batch", "8",
             "--accum", "1", "--steps", "30", "--repeat", "1",
             "--variants", "uptrain train", "uptrain train, compiled layers"),
        # compiling layers on a CPU takes longer than the whole dry run: the compiled variant runs on GPUs only
        cpu=("--hidden", "64", "--layers", "2", "--heads", "4", "--seq-len", "32", "--micro-batch", "2",
             "--accum", "1", "--steps", "10", "--warmup-steps", "5", "--repeat", "1", "--variants", "uptrain train"),
        gpu_limit_s=230,
    ),
    Part(
        "decode", "decode", "scripts.bench_decode", (),
        # 8 of Llama-2-7B's 32 layers: a quarter of the writing, converting and compiling of 6 models, the
        # same width, heads and cache per layer (weights and cache shrink alike; the output layer weighs more)
        gpu=("--preset", "llama2-7b", "--layers", "8", "--groups", "8", "1", "--prompt", "4096", "--new", "64",
             "--batch", "16", "--cache", "static", "--attn", "uptrain_sdpa", "sdpa"),  # the targets' rows first
        cpu=("--preset", "tiny", "--layers", "2", "--groups", "2", "1", "--prompt", "16", "--new", "4",
             "--batch", "2", "--cache", "dynamic"),
        gpu_limit_s=170,
    ),
    Part(
        "fsdp2", "FSDP2: stop, resume, export", "scripts.bench_fsdp2", ("datasets",),
        gpu=("--hidden", "1024", "--layers", "8", "--heads", "16", "--seq-len", "1024", "--micro-batch", "8",
             "--steps", "30", "--every", "10", "--stop-at", "15"),
        cpu=("--hidden", "64", "--layers", "2", "--heads", "4", "--seq-len", "32", "--micro-batch", "2",
             "--steps", "30", "--every", "10", "--stop-at", "15"),
        gpu_limit_s=70,
    ),
    Part(
        "calibration", "calibration and refinement", "scripts.bench_calibration", (),
        gpu=("--hidden", "2048", "--layers", "16", "--heads", "16", "--vocab", "32000", "--refine-steps", "36"),
        cpu=("--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "256", "--calibration-tokens", "256",
             "--refine-steps", "2"),
        gpu_limit_s=70,
    ),
]  # fmt: skip


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def packages_note() -> str:
    """Where datasets, the package the GPU machine lacks, comes from (scripts/gpu_check.sh installs the wheels
    of .gpu-wheels into a folder on PYTHONPATH)."""
    spec = importlib.util.find_spec("datasets")
    if spec is None:
        skipped = ", ".join(p.name for p in PARTS if "datasets" in p.needs)
        return f"datasets is not installed: {skipped} skipped (run make gpu-wheels, and carry .gpu-wheels)"
    where = Path(spec.origin or "").parent.parent
    wheels = str(where) in os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return f"datasets from {where} ({'the wheels of .gpu-wheels' if wheels else 'the installed packages'})"


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, read from /proc (torchrun starts its workers in sessions of their own, so
    the part's process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL a part and every process it started, twice over for any started in between."""
    for _ in range(2):
        for p in process_tree(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.5)


def tail(log: Path, lines: int = 15) -> str:
    """The last lines of a log, with progress bars reduced to their last state."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])


def run_part(part: Part, args: tuple[str, ...], work: Path, out: Path, limit: float) -> dict:
    folder = work / part.name
    folder.mkdir()
    figures, log = folder / "figures.json", folder / "log.txt"
    cmd = [sys.executable, "-m", part.module, *args, "--json", str(figures)]
    shown = shlex.join(["python", "-m", part.module, *args])
    entry: dict = {"title": part.title, "command": shown, "limit_s": round(limit)}
    missing = [m for m in part.needs if importlib.util.find_spec(m) is None]
    if missing:
        why = f"needs {', '.join(missing)}, not installed here (make gpu-wheels, and carry .gpu-wheels)"
        return entry | {"status": "skipped", "why": why}
    if limit <= 0:
        return entry | {"status": "skipped", "why": "no time left in the check's budget"}
    # every temporary file of the part lands in its own folder, removed after it even when it was killed
    env = {**os.environ, "TMPDIR": str(folder), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            code = None
    entry["seconds"] = round(time.perf_counter() - started, 1)
    try:
        entry["figures"] = json.loads(figures.read_text()) if figures.is_file() else None
    except json.JSONDecodeError:  # killed while it wrote them
        entry["figures"] = None
    with log.open("rb") as f:  # the log comes back beside the tables: its last 4 MiB at most
        f.seek(max(0, log.stat().st_size - (4 << 20)))
        (out / f"{part.name}.log").write_bytes(f.read())
    if code is None:
        entry |= {"status": "timed out", "why": f"stopped after {limit:.0f} s", "output": tail(log)}
    elif code != 0:
        entry |= {"status": "failed", "why": f"exit status {code}", "output": tail(log)}
    elif entry["figures"] is None:
        entry |= {"status": "failed", "why": "it wrote no figures", "output": tail(log)}
    else:
        entry["status"] = "ok"
    shutil.rmtree(folder, ignore_errors=True)
    return entry


def write(report: dict, out: Path) -> None:
    """The JSON and the Markdown, each replaced whole."""
    report["targets"] = targets(report)
    for name, text in (("gpu-check.json", json.dumps(report, indent=1)), ("gpu-check.md", markdown(report))):
        tmp = out / f".{name}.partial"
        tmp.write_text(text)
        tmp.replace(out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.environ.get("OUT") or str(DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path(default_out), help=f"where the tables go (default: {default_out})")
    ap.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], default=[p.name for p in PARTS])
    ap.add_argument("--shapes", choices=["auto", "gpu", "cpu"], default="auto",
                    help="auto: the GPU shapes on a GPU, the tiny ones without")  # fmt: skip
    ap.add_argument("--budget", type=float, help=f"seconds for the whole check (default: {GPU_BUDGET_S} on a GPU)")
    ap.add_argument("--jobs", type=int, default=1, help="parts run at once, for a dry run on several cores")
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    shapes = args.shapes if args.shapes != "auto" else ("gpu" if gpu else "cpu")
    if args.jobs > 1 and shapes == "gpu":
        ap.error("--jobs above 1 is for the tiny shapes: parts sharing a GPU would time each other")
    if not gpu:
        print("no GPU here: a dry run of every part with tiny shapes (its figures say nothing about speed)", flush=True)
    budget = args.budget or (GPU_BUDGET_S if shapes == "gpu" else None)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if gpu else f"no GPU: CPU ({os.cpu_count()} cores)",
        "gpu": gpu,
        "shapes": shapes,
        "versions": versions(),
        "packages": packages_note(),
        "budget_s": budget,
        "parts": {},
    }
    print(f"packages: {report['packages']}", flush=True)
    started = time.perf_counter()
    chosen = [p for p in PARTS if p.name in args.parts]

    def one(part: Part, work: Path) -> dict:
        limit = part.gpu_limit_s if shapes == "gpu" else part.cpu_limit_s
        if budget is not None:  # a part starting late gets what is left; under MIN_PART_S, nothing
            left = budget - (time.perf_counter() - started)
            limit = min(limit, left) if left >= MIN_PART_S else 0
        return run_part(part, part.gpu if shapes == "gpu" else part.cpu, work, args.out, limit)

    entries: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="uptrain-gpu-check-") as work, ThreadPoolExecutor(args.jobs) as pool:
        running = {pool.submit(one, part, Path(work)): part for part in chosen}
        for done in as_completed(running):
            name, entry = running[done].name, done.result()
            entries[name] = entry
            report["parts"] = {p.name: entries[p.name] for p in chosen if p.name in entries}
            report["seconds"] = round(time.perf_counter() - started, 1)
            write(report, args.out)
            why = f": {entry['why']}" if "why" in entry else ""
            print(f"{name}: {entry['status']}{why} ({entry.get('seconds', 0):.0f} s)", flush=True)
    print(f"wrote {args.out / 'gpu-check.md'} and gpu-check.json ({report['seconds']:.0f} s)")
    sys.exit(0 if all(e["status"] == "ok" for e in report["parts"].values()) else 1)


if __name__ == "__main__":
    main()
