"""FSDP2 through the launch line users type, timed: a stop, a resume and an export of a small converted model.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes N -m uptrain_gqa train RUN.yaml

runs twice on a Llama-shaped model converted to GQA by uptrain: the first run gets a SIGTERM at its launcher
during step --stop-at (as Slurm sends one before a time limit) and saves a checkpoint; the second resumes
with `--resume auto` and finishes the --steps; `uptrain export` turns the last checkpoint into a model
folder. Reported: seconds per step and peak memory (from metrics.jsonl), seconds to write and to read a
checkpoint (timed inside rank 0), from the signal to the launcher's exit, of the resumed launch, of the
export. On GPUs the processes talk over NCCL; without one, over gloo.

    python -m benchmarks.fsdp2                                                      # CPU: tiny, over gloo
    python -m benchmarks.fsdp2 --hidden 1024 --layers 8 --heads 16 --seq-len 1024   # a small model, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.train import make_corpus, make_model

ROOT = Path(__file__).resolve().parent.parent
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"


def worker(timings: Path, stop_at: int, argv: list[str]) -> int:
    """`uptrain train` as the launcher starts it, with rank 0 timing each checkpoint written and read
    (one JSON line each in `timings`) and, when stop_at > 0, sending SIGTERM to its launcher during
    that step."""
    import uptrain_gqa.training.loop as loop
    from uptrain_gqa.cli import main
    from uptrain_gqa.training.checkpointer import Checkpointer

    main_rank = os.environ.get("RANK", "0") == "0"

    def note(event: str, **facts: object) -> None:
        if main_rank:
            with timings.open("a") as f:
                f.write(json.dumps({"event": event, "time": time.time(), **facts}) + "\n")

    def timed(event: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Checkpointer, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = method(self, *args, **kwargs)
            note(event, seconds=time.perf_counter() - started, path=str(result or args[0]))
            return result

        return wrapper

    Checkpointer.save = timed("save", Checkpointer.save)
    Checkpointer.load = timed("load", Checkpointer.load)
    step = loop.Trainer.step

    def stepping(self: loop.Trainer) -> Any:
        if stop_at and self.state.step == stop_at - 1 and self.acc.is_main_process:
            note("signal", step=stop_at)
            os.kill(os.getppid(), signal.SIGTERM)  # the launcher, as Slurm would
        return step(self)

    loop.Trainer.step = stepping
    return main(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_yaml: Path, timings: Path, stop_at: int, processes: int, *extra: str) -> tuple[int, float, str]:
    """One `accelerate launch` of the timed worker: (exit status, seconds, the end of its stderr)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2),
                "--num_processes", str(processes), "--main_process_port", str(free_port())]  # fmt: skip
    program = ["-m", "benchmarks.fsdp2", "--worker", str(timings), str(stop_at), "train", str(run_yaml), *extra]
    cmd = [*launcher, *program]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - started, proc.stderr[-3000:]


def run_config(model: Path, corpus: Path, out: Path, args: argparse.Namespace) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"files": [str(corpus)], "seq_len": args.seq_len, "validation_blocks": 4},
        "budget": {"steps": args.steps},
        "batch": {"global_batch_size": args.micro_batch * args.processes, "micro_batch_size": args.micro_batch},
        "optim": {"lr": 3e-4, "warmup": 2},
        "checkpoint": {"every": args.every, "keep": 2},
        "logging": {"every": 5, "eval_every": 0, "trackers": []},
        "out": str(out),
    }


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # inside the launcher: python -m benchmarks.fsdp2 --worker FILE STOP ...
        sys.exit(worker(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    ap.add_argument("--stop-at", type=int, default=15, help="the step during which the launcher gets SIGTERM")
    ap.add_argument("--processes", type=int, default=1, help="processes (GPUs) for accelerate launch")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not 0 < args.stop_at < args.steps:
        sys.exit("--stop-at must fall inside the run (0 < STOP_AT < STEPS)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from uptrain_gqa.commands.export import export
    from uptrain_gqa.training.sharding import SHARDED_FOLDER
    from uptrain_gqa.units import format_bytes

    gpu = torch.cuda.is_available()
    kv_heads = max(1, args.heads // 4)
    figures: dict = {
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": kv_heads},
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "processes": args.processes, "steps": args.steps,
        "backend": "nccl" if gpu else "gloo",
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="uptrain-bench-fsdp2-") as tmp:
        work = Path(tmp)
        corpus = make_corpus(work / "data", docs=400)
        model = make_model(work / "model", args)
        run, timings = work / "run", work / "timings.jsonl"
        run_yaml = work / "run.yaml"
        run_yaml.write_text(yaml.safe_dump(run_config(model, corpus, run, args)))

        code, first_s, err = launch(run_yaml, timings, args.stop_at, args.processes)
        if code == 0:
            sys.exit(f"the first run finished without stopping at step {args.stop_at}")
        if code not in (128 + signal.SIGTERM, 1):  # accelerate exits 143 after a signal; torchrun 1
            sys.exit(f"the first run failed (exit {code}):\n{err}")
        figures["first_launch_exit"] = code
        stopped = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
        code, resume_s, err = launch(run_yaml, timings, 0, args.processes, "--resume", "auto")
        if code:
            sys.exit(f"the resumed run failed (exit {code}):\n{err}")
        last = sorted((run / "checkpoints").glob("step-*"))[-1]
        if not (last / SHARDED_FOLDER).is_dir():  # FSDP2 checkpoints are DCP shards; anything else is not FSDP2
            sys.exit(f"{last.name} holds no {SHARDED_FOLDER}/ folder: the run was not sharded by FSDP2")
        started = time.perf_counter()
        export(str(last), str(work / "exported"))  # `uptrain export CHECKPOINT OUT`, in this process
        export_s = time.perf_counter() - started
        if not list((work / "exported").glob("*.safetensors")):
            sys.exit("uptrain export wrote no weights")
        events = [json.loads(line) for line in timings.read_text().splitlines()]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    signalled = next(e["time"] for e in events if e["event"] == "signal")
    stop_save = next(e for e in events if e["event"] == "save" and e["time"] > signalled)
    windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tokens_per_step = args.micro_batch * args.processes * args.seq_len
    peaks = [r["peak_memory_bytes"] for r in rows if "peak_memory_bytes" in r]
    figures |= {
        "first_launch_seconds": first_s,
        "checkpoints_after_stop": stopped,
        "stopped_at_step": int(Path(stop_save["path"]).name.split("-")[1]),
        "final_step": max(r["step"] for r in rows),
        "seconds_per_step": statistics.median(tokens_per_step / w for w in windows),
        "tokens_per_s": statistics.median(windows),
        "peak_memory_bytes": max(peaks, default=None),
        "checkpoint_write_seconds": [e["seconds"] for e in events if e["event"] == "save"],
        "checkpoint_read_seconds": next(e["seconds"] for e in events if e["event"] == "load"),
        "signal_to_saved_seconds": stop_save["time"] - signalled,
        "resumed_launch_seconds": resume_s,
        "export_seconds": export_s,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    peak = "-" if figures["peak_memory_bytes"] is None else format_bytes(figures["peak_memory_bytes"], binary=True)
    print(
        f"\nFSDP2, {args.processes} process(es) over {figures['backend']} on {figures['device']}: "
        f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads -> GQA-{kv_heads}, "
        f"seq {args.seq_len} x {args.micro_batch}"
    )
    print("| figure | value |\n|---|---|")
    print(f"| seconds per step (median window) | {figures['seconds_per_step']:.4f} |")
    print(f"| peak memory | {peak} |")
    print(f"| checkpoint written (s, each) | {', '.join(f'{s:.2f}' for s in figures['checkpoint_write_seconds'])} |")
    print(f"| checkpoint read on resume (s) | {figures['checkpoint_read_seconds']:.2f} |")
    print(f"| SIGTERM -> checkpoint saved (s) | {figures['signal_to_saved_seconds']:.2f} |")
    print(f"| stopped at step, resumed to | {figures['stopped_at_step']} -> {figures['final_step']} |")
    print(f"| resumed launch, start to end (s) | {resume_s:.1f} |")
    print(f"| uptrain export (s) | {export_s:.1f} |")


if __name__ == "__main__":
    main()
