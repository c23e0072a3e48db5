"""The built-in pipeline behind `make demo` (`python -m uptrain_gqa.demo`) and experiments/reproduce_gqa_paper.py.

It runs the real commands — `uptrain train` (the MHA source, from scratch), `uptrain convert`,
`uptrain train` (uptraining), `uptrain eval` — on the built-in Shakespeare corpus, and caches
the source model (keyed by its recipe, architecture, corpus and tokenizer) so later runs start
from it. Commands run in a subprocess each by default (as a user would type them), or in this
process (tests).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uptrain_gqa.data.corpora import SHAKESPEARE, cache_dir, fetch
from uptrain_gqa.demo.corpus import train_tokenizer
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import read_config
from uptrain_gqa.model.shape import shape_of_config_json

CONFIGS = Path(str(importlib.resources.files("uptrain_gqa.demo") / "configs"))
"""The demo's run configs and source architecture, shipped inside the package (a real folder once installed)."""


def run_subprocess(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "uptrain_gqa", *args])
    if proc.returncode:
        raise UptrainError(f"`uptrain {shlex.join(args)}` failed with exit status {proc.returncode}")


def run_in_process(args: list[str]) -> None:
    from uptrain_gqa.cli import main

    code = main(args)
    if code:
        raise UptrainError(f"`uptrain {shlex.join(args)}` failed with exit status {code}")


@dataclass
class Pipeline:
    """Where things are, and how to run a command."""

    out: Path
    """Folder for converted, uptrained and evaluated models."""
    corpus: Path | None = None
    """Folder with train/ and heldout/ text files; default: the built-in corpus, fetched."""
    pretrain: Path = CONFIGS / "pretrain.yaml"
    uptrain: Path = CONFIGS / "uptrain.yaml"
    architecture: Path = CONFIGS / "source-llama-mha.json"
    vocab_size: int = 4096
    pretrain_overrides: list[str] = field(default_factory=list)
    """Extra --key=value settings for the source's pretraining (tests shrink it)."""
    uptrain_overrides: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    run: Callable[[list[str]], None] = run_subprocess
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)

    def uptrain_cmd(self, *args: Any) -> None:
        args_ = [str(a) for a in args]
        self.log(f"\n$ uptrain {shlex.join(args_)}")
        start = time.perf_counter()
        self.run(args_)
        self.log(f"({time.perf_counter() - start:.0f} s)")

    # --- the source -------------------------------------------------------------------------

    def text(self) -> Path:
        if self.corpus is None:
            self.corpus = fetch(SHAKESPEARE)
        return self.corpus

    def data_overrides(self) -> list[str]:
        c = self.text()
        return [f"--data.files=[{c / 'train'}/*.txt]", f"--data.validation_files=[{c / 'heldout'}/*.txt]"]

    def tokenizer(self) -> Path:
        c = self.text()
        files = sorted((c / "train").glob("*.txt"))
        key = hashlib.sha256("".join(f"{f.name}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:12]
        folder = cache_dir() / "tokenizers" / f"bpe{self.vocab_size}-{key}"
        if not (folder / "tokenizer.json").is_file():
            self.log(f"training a {self.vocab_size}-token BPE tokenizer on {len(files)} files ...")
            train_tokenizer(files, folder.with_suffix(".partial"), self.vocab_size)
            folder.with_suffix(".partial").rename(folder)
        return folder

    def source_run(self) -> Path:
        """The run folder of the MHA source (its model in model/): reused when the recipe is unchanged."""
        tok = self.tokenizer()
        parts = [self.pretrain.read_text(), self.architecture.read_text(), (tok / "tokenizer.json").read_text(),
                 str(self.text()), *self.pretrain_overrides]  # fmt: skip
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
        run = cache_dir() / "demo" / f"source-{key}"
        if (run / "model" / "config.json").is_file():
            self.log(f"reusing the MHA source model in {run / 'model'}")
            return run
        self.log("pretraining the MHA source model from scratch (once; later runs reuse it) ...")
        self.uptrain_cmd(
            "train", self.pretrain, f"--model.config={self.architecture}", f"--model.tokenizer={tok}",
            *self.data_overrides(), f"--out={run}", "--resume", "auto", *self.pretrain_overrides,
        )  # fmt: skip
        return run

    def source_tokens(self, run: Path) -> int:
        """Tokens the source was pretrained on (from its metrics)."""
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return max(r["tokens"] for r in rows)

    # --- conversion, uptraining, evaluation ---------------------------------------------------

    def convert(
        self, source: Path, name: str, g: int, method: str = "mean", seed: int = 0, extra: list[str] | None = None
    ) -> Path:
        out = self.out / f"{name}-converted"
        self.uptrain_cmd("convert", source, out, "--num-kv-heads", g, "--method", method, "--seed", seed,
                         "--overwrite", "--quiet", *(extra or []))  # fmt: skip
        return out

    def uptrain_model(self, model: Path, name: str, original_tokens: int, fraction: float = 0.05, seed: int = 0,
                      extra: list[str] | None = None) -> Path:  # fmt: skip
        run = self.out / f"{name}-uptrained"
        self.uptrain_cmd(
            "train", self.uptrain, f"--model.path={model}", *self.data_overrides(),
            f"--budget.original_tokens={original_tokens}", f"--budget.fraction={fraction}", f"--seed={seed}",
            f"--out={run}", "--overwrite", *self.uptrain_overrides, *(extra or []),
        )  # fmt: skip
        return run / "model"

    def evaluate(self, model: Path, name: str, reference: Path | None = None, speed: bool = True) -> dict[str, Any]:
        out = self.out / f"eval-{name}.json"
        args = ["eval", model, f"--data.files=[{self.text() / 'heldout'}/*.txt]", "--json", out, *self.eval_args]
        if reference is not None:
            args[2:2] = ["--reference", reference]
        if not speed:
            args.append("--no-speed")
        self.uptrain_cmd(*args)
        return json.loads(out.read_text())


def demo(p: Pipeline) -> list[dict[str, Any]]:
    """Source -> GQA (H/4) and MQA -> uptrained for alpha = 5 %, all evaluated against the source.
    Returns one row per model for `table`."""
    source_run = p.source_run()
    source = source_run / "model"
    tokens = p.source_tokens(source_run)
    heads = shape_of_config_json(read_config(source)).heads
    base = p.evaluate(source, "source")
    rows = [
        {
            "model": f"MHA source ({tokens:,} tokens)",
            "kv_heads": heads,
            "kv_bytes_per_token": base["kv_cache"]["model"]["bytes_per_token"],
            "perplexity_converted": base["quality"]["perplexity"],
            "perplexity_uptrained": None,
            "kl_converted": 0.0,
            "kl_uptrained": None,
            "decode_tokens_per_s": base["decode"]["model"]["decode_tokens_per_s"],
            "eval": base,
        }
    ]
    for g in (heads // 4, 1):
        name = "mqa" if g == 1 else f"gqa{g}"
        converted = p.convert(source, name, g)
        before = p.evaluate(converted, f"{name}-converted", reference=source, speed=False)
        after = p.evaluate(p.uptrain_model(converted, name, tokens), f"{name}-uptrained", reference=source)
        rows.append(
            {
                "model": "MQA" if g == 1 else f"GQA-{g}",
                "kv_heads": g,
                "kv_bytes_per_token": after["kv_cache"]["model"]["bytes_per_token"],
                "perplexity_converted": before["quality"]["perplexity"],
                "perplexity_uptrained": after["quality"]["perplexity"],
                "kl_converted": before["quality"]["kl"],
                "kl_uptrained": after["quality"]["kl"],
                "decode_tokens_per_s": after["decode"]["model"]["decode_tokens_per_s"],
                "eval": after,
            }
        )
    return rows


def environment_line() -> str:
    """What the demo's numbers depend on besides the code: library versions, torch's threads and the CPU
    kernels it picked. The runs are seeded and deterministic, but a different rounding anywhere grows,
    over 391 steps of training from scratch, into another source model of about the same quality."""
    import torch

    from uptrain_gqa.device import environment

    versions = environment()["versions"]
    names = ("torch", "transformers", "tokenizers", "datasets")
    libraries = ", ".join(f"{name} {versions.get(name)}" for name in names)
    return (
        f"environment: uptrain {versions.get('uptrain-gqa')}, {libraries}, {torch.get_num_threads()} torch threads, "
        f"CPU kernels {torch.backends.cpu.get_cpu_capability()}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """The demo's one table (markdown)."""

    def ppl(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| model | KV heads | KV bytes/token | perplexity after conversion | perplexity after uptraining "
        "(alpha = 5 %) | KL to the source, after conversion -> after uptraining | decode tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = "0" if r["kl_uptrained"] is None else f"{r['kl_converted']:.3f} -> {r['kl_uptrained']:.3f}"
        lines.append(
            f"| {r['model']} | {r['kv_heads']} | {r['kv_bytes_per_token']:,} | {ppl(r['perplexity_converted'])} "
            f"| {ppl(r['perplexity_uptrained'])} | {kl} | {r['decode_tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)
