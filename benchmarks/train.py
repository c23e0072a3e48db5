"""Benchmark the training throughput of `uptrain train` against transformers' Trainer.

Both train the same converted GQA checkpoint on the same packed blocks with the same batch
geometry (micro-batch x accumulation), optimizer (fused AdamW), schedule and clipping, for the
same number of steps, each in a fresh process on this machine. Throughput is measured over the
steady-state steps only (the first `--warmup-steps` steps, data preparation, evaluation and
saving are excluded on both sides) and reported as training tokens per second, with the ratio,
MFU and peak memory on a GPU. `--json FILE` keeps the figures, rewritten after every run.

    python -m benchmarks.train                  # CPU-sized model (defaults below)
    python -m benchmarks.train --hidden 2048 --layers 16 --heads 16 --seq-len 2048   # ~1B on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def make_corpus(folder: Path, docs: int) -> Path:
    """Short grammatical documents as one JSON-lines file (uptrain_gqa.synthetic's corpus)."""
    from uptrain_gqa.synthetic import write_corpus

    return write_corpus(folder / "corpus.jsonl", docs, fmt="jsonl")


def make_model(folder: Path, args: argparse.Namespace) -> Path:
    """A Llama-shaped MHA model with a word-level tokenizer, converted to GQA by uptrain."""
    import torch
    from transformers import AutoModelForCausalLM

    from uptrain_gqa import convert
    from uptrain_gqa.synthetic import corpus_words, llama_config, save_word_tokenizer

    vocab = max(64, len(corpus_words()))
    cfg = llama_config(args.hidden, args.layers, args.heads, vocab=vocab, max_positions=max(args.seq_len, 512),
                       dtype="float32")  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "mha")
    save_word_tokenizer(folder / "mha")
    convert(src=str(folder / "mha"), out=str(folder / "gqa"), num_kv_heads=max(1, args.heads // 4))
    return folder / "gqa"


def uptrain_config(model: Path, corpus: Path, out: Path, args: argparse.Namespace) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"files": [str(corpus)], "seq_len": args.seq_len, "validation_blocks": 8},
        "budget": {"steps": args.steps},
        "batch": {"global_batch_size": args.micro_batch * args.accum, "micro_batch_size": args.micro_batch},
        "optim": {"lr": 3e-4, "warmup": 2, "schedule": "cosine", "weight_decay": 0.1, "grad_clip": 1.0},
        "checkpoint": {"every": 0, "keep": 1},
        "logging": {"every": args.warmup_steps, "eval_every": 0, "trackers": []},
        "out": str(out),
    }


VARIANTS = {  # name -> `uptrain train` overrides
    "uptrain train": [],  # the defaults: chunked cross-entropy, no host syncs inside the step
    "uptrain train, compiled layers": ["--model.compile=true"],
    "uptrain train, plain loss": ["--model.chunked_loss=false"],
}


Run = tuple[float, int | None]
"""tokens/s, and peak GPU memory in bytes (None on a CPU)"""


def run_uptrain(model: Path, corpus: Path, work: Path, args: argparse.Namespace, tag: str, extra: list[str]) -> Run:
    cfg = work / f"uptrain-{tag}.yaml"
    cfg.write_text(yaml.safe_dump(uptrain_config(model, corpus, work / f"run-{tag}", args)))
    proc = subprocess.run(
        [sys.executable, "-m", "uptrain_gqa", "train", str(cfg), *extra], capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"uptrain train {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / f"run-{tag}" / "metrics.jsonl").read_text().splitlines()]
    # one window per `warmup_steps` steps; the first holds the warm-up. Equal windows: harmonic mean.
    windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    peaks = [r["peak_memory_bytes"] for r in rows if "peak_memory_bytes" in r]
    return len(windows) / sum(1 / w for w in windows), max(peaks, default=None)


TRAINER_CHILD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator
from uptrain_gqa.data.blocks import prepare
from uptrain_gqa.data.config import DataConfig
from transformers import AutoTokenizer

args = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(args["model"])
data = prepare(DataConfig(files=[args["corpus"]], seq_len=args["seq_len"], validation_blocks=8), tok, seed=0,
               micro_batch_size=args["micro_batch"])
train = data.train.with_format(None).map(lambda b: {"labels": b["input_ids"]}, batched=True)

class Clock(TrainerCallback):
    def on_step_end(self, a, state, control, **kw):
        if state.global_step == args["warmup_steps"]:
            self.start = time.perf_counter()
        if state.global_step == args["steps"]:
            self.seconds = time.perf_counter() - self.start

clock = Clock()
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
targs = TrainingArguments(
    output_dir=args["out"], per_device_train_batch_size=args["micro_batch"],
    gradient_accumulation_steps=args["accum"], max_steps=args["steps"], learning_rate=3e-4,
    lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0,
    optim="adamw_torch_fused", adam_beta2=0.95, logging_steps=args["warmup_steps"], save_strategy="no",
    report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
    bf16=torch.cuda.is_available(),
)
Trainer(model=model, args=targs, train_dataset=train, data_collator=default_data_collator, callbacks=[clock]).train()
steps = args["steps"] - args["warmup_steps"]
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"tokens_per_s": steps * args["micro_batch"] * args["accum"] * args["seq_len"] / clock.seconds,
                  "peak_memory_bytes": peak}))
"""


def run_trainer(model: Path, corpus: Path, work: Path, args: argparse.Namespace, tag: str) -> Run:
    payload = {
        "model": str(model),
        "corpus": str(corpus),
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "accum": args.accum,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "out": str(work / f"trainer-{tag}"),
    }
    proc = subprocess.run([sys.executable, "-c", TRAINER_CHILD, json.dumps(payload)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"Trainer run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["tokens_per_s"], result["peak_memory_bytes"]


def figures(args: argparse.Namespace, params: int, runs: dict[str, list[Run]], device: str, gpu: bool) -> dict:
    """What --json keeps: the set-up, every run, and each trainer's best run with its MFU."""
    from uptrain_gqa.training.budget import mfu

    trainer = max((r[0] for r in runs["transformers Trainer"]), default=None)
    best = {}
    for name, done in runs.items():
        if done:
            tps, peak = max(done, key=lambda r: r[0])
            best[name] = {
                "tokens_per_s": tps,
                "vs_trainer": tps / trainer if trainer else None,
                "mfu": mfu(tps, params, args.peak_tflops, 1) if gpu else None,
                "peak_memory_bytes": peak,
            }
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": max(1, args.heads // 4)}
    batch = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "accum": args.accum, "steps": args.steps}
    return {
        "model": {**shape, "params_matmul": params},
        **batch,
        "timed_steps": args.steps - args.warmup_steps,
        "device": device,
        "peak_tflops": args.peak_tflops,
        "runs": {name: [r[0] for r in done] for name, done in runs.items()},
        "best": best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps excluded from the timing")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; the best is kept")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="uptrain configurations to time beside the Trainer")  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write the figures here (rewritten after every run)")
    args = ap.parse_args()
    if args.steps % args.warmup_steps:
        sys.exit("--steps must be a multiple of --warmup-steps")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoConfig

    from uptrain_gqa.model.shape import count_parameters
    from uptrain_gqa.units import format_bytes

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(prefix="uptrain-bench-train-") as tmp:
        work = Path(tmp)
        corpus = make_corpus(work / "data", docs=2000)
        model = make_model(work / "model", args)
        params = count_parameters(AutoConfig.from_pretrained(model), matmul_only=True)
        variants = {name: VARIANTS[name] for name in args.variants}
        runs: dict[str, list[Run]] = {**{name: [] for name in variants}, "transformers Trainer": []}
        for i in range(args.repeat):
            for j, (name, extra) in enumerate(variants.items()):
                runs[name].append(run_uptrain(model, corpus, work, args, f"{i}-{j}", extra))
                if args.json:  # a run cut short by a time limit keeps what finished
                    args.json.write_text(json.dumps(figures(args, params, runs, device, gpu), indent=1))
            runs["transformers Trainer"].append(run_trainer(model, corpus, work, args, str(i)))
            if args.json:
                args.json.write_text(json.dumps(figures(args, params, runs, device, gpu), indent=1))
            print(f"  run {i}: " + ", ".join(f"{k} {v[-1][0]:,.0f} tok/s" for k, v in runs.items()), file=sys.stderr)
    print(
        f"\nLlama-shaped model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads -> GQA-"
        f"{max(1, args.heads // 4)}; seq {args.seq_len}, micro-batch {args.micro_batch} x {args.accum} accumulation, "
        f"{args.steps} steps ({args.steps - args.warmup_steps} timed); {device}"
    )
    # MFU on a GPU: 6·N FLOPs per token over --peak-tflops, 989 by default: the dense bf16 peak of the H100
    # SXM and the H200 in NVIDIA's datasheets (1,979 with 2:4 sparsity)
    result = figures(args, params, runs, device, gpu)
    print("| trainer | tokens/s (best) | all runs | vs Trainer | MFU | peak memory |")
    print("|---|---|---|---|---|---|")
    for name, best in result["best"].items():
        every = ", ".join(f"{v:,.0f}" for v in result["runs"][name])
        util = "-" if best["mfu"] is None else f"{best['mfu']:.1%}"
        peak = "-" if best["peak_memory_bytes"] is None else format_bytes(best["peak_memory_bytes"], binary=True)
        print(f"| {name} | {best['tokens_per_s']:,.0f} | {every} | {best['vs_trainer']:.2f} | {util} | {peak} |")
    fastest = max(result["best"][name]["vs_trainer"] for name in args.variants)
    print(f"\nratio fastest uptrain / Trainer: {fastest:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
