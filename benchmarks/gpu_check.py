"""One prepared GPU check: training throughput, decode, FSDP2 over NCCL and calibration, in one command.

Each part runs one benchmark script in a process of its own with its own time limit, so a failure or a
timeout loses only that part; after every part, one JSON and one Markdown table are rewritten in --out
($OUT when set, else gpu-check-out/), with each part's status (ok / failed with the end of its output /
timed out with what it had measured / skipped and why), its figures and its command line, and whether
each target was met. The report is written before the first part starts (each part waiting, then running), so
a check killed outright still says what it had done; SIGTERM, SIGINT or SIGHUP stop the running parts, keep
what they had measured, and end the check with 128 + the signal's number. An --out that cannot hold the
report is refused before any part runs.

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
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu_check_report import markdown, targets
from uptrain_gqa.errors import Interrupted, UptrainError, first_line
from uptrain_gqa.io.folders import write_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "gpu-check-out"
GPU_BUDGET_S = 540  # the whole check on a GPU: 9 minutes, inside a 10-minute command on a 15-minute lease
MIN_PART_S = 10  # a part that would get less than this is skipped
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
        "train", "training throughput", "benchmarks.train", ("datasets",),
        gpu=("--hidden", "2048", "--layers", "16", "--heads", "16", "--seq-len", "2048", "--micro-batch", "8",
             "--accum", "1", "--steps", "30", "--repeat", "1",
             "--variants", "uptrain train", "uptrain train, compiled layers"),
        # compiling layers on a CPU takes longer than the whole dry run: the compiled variant runs on GPUs only
        cpu=("--hidden", "64", "--layers", "2", "--heads", "4", "--seq-len", "32", "--micro-batch", "2",
             "--accum", "1", "--steps", "10", "--warmup-steps", "5", "--repeat", "1", "--variants", "uptrain train"),
        gpu_limit_s=230,
    ),
    Part(
        "decode", "decode", "benchmarks.decode", (),
        # 8 of Llama-2-7B's 32 layers: a quarter of the writing, converting and compiling of 6 models, the
        # same width, heads and cache per layer (weights and cache shrink alike; the output layer weighs more)
        gpu=("--preset", "llama2-7b", "--layers", "8", "--groups", "8", "1", "--prompt", "4096", "--new", "64",
             "--batch", "16", "--cache", "static", "--attn", "uptrain_sdpa", "sdpa"),  # the targets' rows first
        cpu=("--preset", "tiny", "--layers", "2", "--groups", "2", "1", "--prompt", "16", "--new", "4",
             "--batch", "2", "--cache", "dynamic"),
        gpu_limit_s=170,
    ),
    Part(
        "fsdp2", "FSDP2: stop, resume, export", "benchmarks.fsdp2", ("datasets",),
        gpu=("--hidden", "1024", "--layers", "8", "--heads", "16", "--seq-len", "1024", "--micro-batch", "8",
             "--steps", "30", "--every", "10", "--stop-at", "15"),
        cpu=("--hidden", "64", "--layers", "2", "--heads", "4", "--seq-len", "32", "--micro-batch", "2",
             "--steps", "30", "--every", "10", "--stop-at", "15"),
        gpu_limit_s=70,
    ),
    Part(
        "calibration", "calibration and refinement", "benchmarks.calibration", (),
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
    """Where datasets, the package the GPU machine lacks, comes from (benchmarks/gpu_check.sh installs the wheels
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


class Stop:
    """The parts running now, and whether the check was told to stop (by a signal): a part stopped then is
    reported as stopped, and a part not started yet does not start."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, subprocess.Popen] = {}
        self.signum: int | None = None

    def start(self, name: str, proc: subprocess.Popen) -> None:
        with self.lock:
            self.running[name] = proc
            stopping = self.signum is not None
        if stopping:  # the signal came while it started
            kill_tree(proc.pid)

    def end(self, name: str) -> None:
        with self.lock:
            self.running.pop(name, None)

    def now(self, signum: int) -> None:
        """Stop: kill every running part with what it started."""
        with self.lock:
            self.signum = signum
            procs = list(self.running.values())
        for proc in procs:
            kill_tree(proc.pid)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def head(part: Part, args: tuple[str, ...], limit: float) -> dict:
    """What the report says of a part before it has run: its title, command line and time limit."""
    shown = shlex.join(["python", "-m", part.module, *args])
    return {"title": part.title, "command": shown, "limit_s": round(limit)}


def run_part(part: Part, args: tuple[str, ...], work: Path, out: Path, limit: float, stop: Stop | None = None) -> dict:
    folder = work / part.name
    folder.mkdir()
    figures, log = folder / "figures.json", folder / "log.txt"
    cmd = [sys.executable, "-m", part.module, *args, "--json", str(figures)]
    entry = head(part, args, limit)
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
        if stop is not None:
            stop.start(part.name, proc)
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            code = None
        finally:
            if stop is not None:
                stop.end(part.name)
    entry["seconds"] = round(time.perf_counter() - started, 1)
    try:
        entry["figures"] = json.loads(figures.read_text()) if figures.is_file() else None
    except json.JSONDecodeError:  # killed while it wrote them
        entry["figures"] = None
    try:  # the log comes back beside the tables: its last 4 MiB at most; failing that, the figures still do
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - (4 << 20)))
            write_file(out / f"{part.name}.log", f.read(), "the part's log")
    except (OSError, UptrainError) as e:
        entry["log"] = f"not kept: {first_line(e)}"
    if stop is not None and stop.signum is not None and code != 0:
        why = f"the check was stopped by {signal_name(stop.signum)} after {entry['seconds']:.0f} s"
        entry |= {"status": "stopped", "why": why, "output": tail(log)}
    elif code is None:
        entry |= {"status": "timed out", "why": f"stopped after {limit:.0f} s", "output": tail(log)}
    elif code != 0:
        entry |= {"status": "failed", "why": f"exit status {code}", "output": tail(log)}
    elif entry["figures"] is None:
        entry |= {"status": "failed", "why": "it wrote no figures", "output": tail(log)}
    else:
        entry["status"] = "ok"
    shutil.rmtree(folder, ignore_errors=True)
    return entry


REPORT = ("gpu-check.json", "gpu-check.md")


def write(report: dict, out: Path) -> None:
    """The JSON and the Markdown, each replaced whole (a new temporary file beside it, opened exclusively and
    never through a link, renamed over it), so that a check killed at any moment leaves the last whole one."""
    report["targets"] = targets(report)
    for name, text in zip(REPORT, (json.dumps(report, indent=1), markdown(report)), strict=True):
        write_file(out / name, text.encode(), "the report")


def prepare_out(out: Path, chosen: list[Part], report: dict) -> None:
    """Refuse, before any part runs, an --out that cannot hold the report and the logs: a file, a folder that
    cannot be created or written into, a link or a special file where the report or a log goes; then write
    the report with every part waiting."""
    if out.exists() and not out.is_dir():
        raise UptrainError(f"--out {out} is not a folder but a file: choose a folder (or set OUT to one)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UptrainError(
            f"cannot create --out {out} ({e.strerror or first_line(e)}): choose a folder you can write into"
        ) from e
    for name in (*REPORT, *(f"{p.name}.log" for p in chosen)):
        path = out / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise UptrainError(f"{path} is not a regular file, and the check replaces only those: choose another --out")
    try:
        write(report, out)
    except OSError as e:
        raise UptrainError(
            f"cannot write into --out {out} ({e.strerror or first_line(e)}): choose a folder you can write into"
        ) from e


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of parts at once, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (the parts run at once), got {text}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """Errors in one line: what is wrong, and where the usage is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help for the usage)\n")


def refuse(message: str) -> None:
    print(f"gpu-check: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main() -> None:
    ap = Parser(prog="gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.environ.get("OUT") or str(DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=Path(default_out), help=f"where the tables go (default: {default_out})")
    ap.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], default=[p.name for p in PARTS])
    ap.add_argument("--shapes", choices=["auto", "gpu", "cpu"], default="auto",
                    help="auto: the GPU shapes on a GPU, the tiny ones without")  # fmt: skip
    ap.add_argument("--budget", type=positive_seconds,
                    help=f"seconds for the whole check (default: {GPU_BUDGET_S} on a GPU)")  # fmt: skip
    ap.add_argument("--jobs", type=positive_int, default=1, help="parts run at once, for a dry run on several cores")
    args = ap.parse_args()
    try:
        import torch
    except ModuleNotFoundError:
        refuse(
            f"{sys.executable} has no torch: run `make gpu-check` (it creates .venv first) or use a python with torch"
        )

    gpu = torch.cuda.is_available()
    shapes = args.shapes if args.shapes != "auto" else ("gpu" if gpu else "cpu")
    if args.jobs > 1 and shapes == "gpu":
        ap.error("--jobs above 1 is for the tiny shapes: parts sharing a GPU would time each other")
    budget = args.budget or (GPU_BUDGET_S if shapes == "gpu" else None)
    chosen = [p for p in PARTS if p.name in args.parts]

    def shape(part: Part) -> tuple[str, ...]:
        return part.gpu if shapes == "gpu" else part.cpu

    def limit_of(part: Part, left: float | None) -> float:
        limit = part.gpu_limit_s if shapes == "gpu" else part.cpu_limit_s
        if left is None:
            return limit
        return min(limit, left) if left >= MIN_PART_S else 0  # a part starting late gets what is left, or nothing

    report: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if gpu else f"no GPU: CPU ({os.cpu_count()} cores)",
        "gpu": gpu,
        "shapes": shapes,
        "versions": versions(),
        "packages": packages_note(),
        "budget_s": budget,
        "seconds": 0,
        "parts": {p.name: head(p, shape(p), limit_of(p, budget)) | {"status": "waiting"} for p in chosen},
    }
    try:  # before any part runs: a part's measurement is never lost for want of a place to put it
        prepare_out(args.out, chosen, report)
    except UptrainError as e:
        refuse(str(e))
    if not gpu:
        print("no GPU here: a dry run of every part with tiny shapes (its figures say nothing about speed)", flush=True)
    print(f"packages: {report['packages']}", flush=True)
    started = time.perf_counter()
    stop, lock = Stop(), threading.Lock()
    unsaved: list[str] = []  # why the last write of the report failed, if it did

    def record(name: str, entry: dict) -> None:
        """Put a part's entry into the report and write it at once: nothing measured waits for the end."""
        with lock:
            report["parts"][name] = entry
            report["seconds"] = round(time.perf_counter() - started, 1)
            unsaved.clear()
            try:
                write(report, args.out)
            except (OSError, UptrainError) as e:
                unsaved.append(first_line(e))
                print(f"gpu-check: warning: the report was not written: {unsaved[0]}", file=sys.stderr, flush=True)

    def finish(name: str, entry: dict) -> None:
        record(name, entry)
        why = f": {entry['why']}" if "why" in entry else ""
        print(f"{name}: {entry['status']}{why} ({entry.get('seconds', 0):.0f} s)", flush=True)

    def not_run(part: Part, signum: int) -> dict:
        why = f"the check was stopped by {signal_name(signum)} before it started"
        return head(part, shape(part), limit_of(part, budget)) | {"status": "not run", "why": why}

    def one(part: Part, work: Path) -> dict:
        left = None if budget is None else budget - (time.perf_counter() - started)
        limit = limit_of(part, left)
        if stop.signum is not None:
            return not_run(part, stop.signum)
        record(part.name, head(part, shape(part), limit) | {"status": "running", "since": time.strftime("%H:%M:%S")})
        try:
            return run_part(part, shape(part), work, args.out, limit, stop)
        except Exception as e:  # the check's own failure (a full disk, ...): this part's, and the others still run
            return head(part, shape(part), limit) | {
                "status": "failed",
                "why": f"the check could not run it: {first_line(e)}",
            }

    stopped: int | None = None
    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, _interrupt)
        with tempfile.TemporaryDirectory(prefix="uptrain-gpu-check-") as work, ThreadPoolExecutor(args.jobs) as pool:
            futures: dict = {}
            done_parts: set[str] = set()
            try:
                for part in chosen:
                    futures[pool.submit(one, part, Path(work))] = part
                for done in as_completed(futures):
                    finish(futures[done].name, done.result())
                    done_parts.add(futures[done].name)
            except Interrupted as e:  # stop the running parts, keep what they measured, start no other
                stopped = e.signum
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_IGN)
                stop.now(stopped)
                pool.shutdown(wait=True, cancel_futures=True)
                submitted = {part.name: future for future, part in futures.items()}
                for part in chosen:
                    if part.name not in done_parts:
                        future = submitted.get(part.name)
                        stopped_before = future is None or future.cancelled()
                        finish(part.name, not_run(part, stopped) if stopped_before else future.result())
    except Interrupted as e:  # after every part had ended: the report is whole
        stopped = e.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if unsaved:  # the figures are not lost: they go to stdout
        print(json.dumps(report, indent=1))
        print(
            f"gpu-check: error: the report could not be written into {args.out} ({unsaved[0]}); it is above",
            file=sys.stderr,
        )
        sys.exit(1)
    if stopped is not None:
        print(
            f"gpu-check: stopped by {signal_name(stopped)}; {args.out / 'gpu-check.md'} holds what had run",
            file=sys.stderr,
        )
        sys.exit(128 + stopped)
    print(f"wrote {args.out / 'gpu-check.md'} and gpu-check.json ({report['seconds']:.0f} s)")
    sys.exit(0 if all(e["status"] == "ok" for e in report["parts"].values()) else 1)


if __name__ == "__main__":
    main()
