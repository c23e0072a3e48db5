"""The `uptrain train` configuration: one dataclass per section, a docstring per field.

Checks that need only the values live in `__post_init__`; checks that need files (data paths,
the model's maximum positions, the teacher's vocabulary) run in `uptrain_gqa.training.model.preflight`
before any work starts. The `data` section is `uptrain_gqa.data.config.DataConfig`. The run configs that
ship with the package (uptrain_gqa/configs/, `configs/` in a clone) are found by name with `shipped_config`.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from uptrain_gqa.config import positive
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.errors import UptrainError

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    path: str | None = None
    """Checkpoint to train: a local Hugging Face folder (e.g. the output of `uptrain convert`) or a Hub id."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """'pretrained' loads `path`; 'scratch' builds a randomly initialised model from `config`."""
    config: str | None = None
    """With init=scratch: a config.json file, or a folder holding one, describing the architecture."""
    tokenizer: str | None = None
    """Tokenizer folder or Hub id; default: the model folder (`path`, or the folder of `config`)."""
    revision: str | None = None
    """Hub revision of `path`."""
    dtype: Dtype = "float32"
    """dtype of the trained weights and optimizer state (keep float32 with mixed precision)."""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the final model; auto = the dtype the source checkpoint was stored in (float32 from scratch)."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """Attention kernel. sdpa and flash_attention_2 attend to shared K/V heads without repeating them."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile each decoder layer (the same loss and gradients; faster on GPUs after the first steps)."""
    chunked_loss: bool = True
    """Compute the output layer and cross-entropy in chunks of positions, never all the fp32 logits at once
    (same loss and gradients, also under FSDP2; off automatically with distillation, or an output layer with
    a bias, logit scale or soft-capping)."""

    def __post_init__(self) -> None:
        if self.init == "pretrained" and not self.path:
            raise UptrainError("model.path is required (or set model.init: scratch and model.config)")
        if self.init == "scratch" and not self.config:
            raise UptrainError("model.init: scratch needs model.config (a config.json describing the model)")


@dataclass
class BatchConfig:
    global_batch_size: int | None = None
    """Sequences per optimizer step over all processes; global batch tokens = this x data.seq_len. Default: 2^20
    tokens per step for a model of 7B parameters or more (512 x 2048), proportionally fewer for a smaller one,
    rounded up to whole micro-batches on every process."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on each process; gradient accumulation makes up the global batch."""

    def __post_init__(self) -> None:
        positive("batch", global_batch_size=self.global_batch_size, micro_batch_size=self.micro_batch_size)


@dataclass
class BudgetConfig:
    tokens: int | None = None
    """Tokens to train on, e.g. 1e11."""
    fraction: float | None = None
    """A fraction of the original pretraining tokens, e.g. 0.05 (the GQA paper's alpha); needs original_tokens."""
    original_tokens: int | None = None
    """Tokens the source model was pretrained on, e.g. 2e12 for Llama-2."""
    steps: int | None = None
    """Optimizer steps to run."""
    gpu_peak_tflops: float = 989.0
    """Peak dense bf16 TFLOP/s of one accelerator, for the GPU-hours estimate and MFU (H100 SXM: 989); runs on
    CPUs log no MFU."""
    assumed_mfu: float = 0.4
    """Model FLOPs utilisation assumed for the GPU-hours estimate."""

    def __post_init__(self) -> None:
        given = [n for n in ("tokens", "fraction", "steps") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UptrainError(
                "budget needs exactly one of budget.tokens, budget.fraction (with budget.original_tokens) "
                f"or budget.steps; got {', '.join(given) or 'none'}"
            )
        if self.fraction is not None and self.original_tokens is None:
            raise UptrainError("budget.fraction needs budget.original_tokens (the source's pretraining tokens)")
        positive(
            "budget",
            tokens=self.tokens,
            fraction=self.fraction,
            original_tokens=self.original_tokens,
            steps=self.steps,
            gpu_peak_tflops=self.gpu_peak_tflops,
            assumed_mfu=self.assumed_mfu,
        )
        if self.assumed_mfu > 1:
            raise UptrainError(f"budget.assumed_mfu is a fraction of peak, at most 1; got {self.assumed_mfu}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr x this."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup: float = 0.01
    """Warmup length: a fraction of the steps when below 1, else a number of steps."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    trainable: str | None = None
    """Regular expression: only parameters whose name it matches (re.search) train, the rest stay as loaded,
    e.g. 'self_attn' for the attention that conversion changed. Default: every parameter."""

    def __post_init__(self) -> None:
        positive("optim", lr=self.lr, eps=self.eps)
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise UptrainError(f"optim.trainable is not a regular expression ({e}): {self.trainable!r}") from None
        if not 0 <= self.min_lr_ratio <= 1:
            raise UptrainError(f"optim.min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UptrainError("optim.warmup, optim.weight_decay and optim.grad_clip must not be negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UptrainError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class DistillConfig:
    teacher: str | None = None
    """The source (MHA) checkpoint as a frozen teacher; distillation is off when empty."""
    weight: float = 1.0
    """w in loss = (1 - w)·CE + w·T²·KL(teacher || student). 1 (logit-only KL) kept the most of the source
    on a real checkpoint; the 50/50 mix was worse than either alone there (docs/results.md)."""
    temperature: float = 1.0
    """T, the softmax temperature of both distributions in the KL term."""

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise UptrainError(f"distill.weight must be within [0, 1], got {self.weight}")
        positive("distill", temperature=self.temperature)


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save a resumable checkpoint every this many optimizer steps (and always at the end); 0: only at the end."""
    keep: int = 3
    """Keep the last this many checkpoints."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise UptrainError(f"checkpoint.every must not be negative, got {self.every}")
        positive("checkpoint", keep=self.keep)


@dataclass
class LoggingConfig:
    every: int = 10
    """Log loss, lr, grad norm, tokens/s and MFU every this many steps."""
    eval_every: int = 500
    """Compute validation loss and perplexity every this many steps (and at the start and end); 0: start and end."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers, e.g. [tensorboard, wandb]; tensorboard, when not installed, is skipped with a line
    saying so (OUT/metrics.jsonl and OUT/loss.png are written whatever the trackers)."""
    project: str = "uptrain"
    """Tracker project name."""
    run_name: str | None = None
    """Tracker run name (wandb); default: the run folder's name."""
    tags: list[str] = field(default_factory=list)
    """Tracker run tags (wandb), e.g. [gqa8, llama2]."""

    def __post_init__(self) -> None:
        positive("logging", every=self.every)
        if self.eval_every < 0:
            raise UptrainError(f"logging.eval_every must not be negative, got {self.eval_every}")
        from accelerate.utils import LoggerType

        known = [t.value for t in LoggerType if t.value != "all"]
        for name in self.trackers:  # before the model loads, not when accelerate first meets the name
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise UptrainError(
                    f"logging.trackers: unknown tracker {name!r}; {hint}accelerate knows {', '.join(known)}"
                )


@dataclass
class TrainConfig:
    model: ModelConfig
    """What to train."""
    data: DataConfig
    """What to train on."""
    budget: BudgetConfig
    """How long to train."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batch geometry."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Optional distillation from the source model."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and trackers."""
    out: str = "runs/uptrain"
    """Run folder: the resolved config, metrics.jsonl, checkpoints/ and the final model in OUT/model."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision; auto = bf16 on accelerators that support it, else none (CPU)."""


# Sections that may change when resuming: they do not alter what the steps compute.
RESUMABLE_CHANGES = ("budget", "checkpoint", "logging", "out")


# --- the run configs shipped in the package ---------------------------------------------------

SHIPPED_DIR = Path(str(importlib.resources.files("uptrain_gqa") / "configs"))
"""The package's configs/ folder (package data: in a wheel too): run configs, and accelerate/ with the
`accelerate launch --config_file` files (ddp.yaml, fsdp2.yaml)."""

SHIPPED_CONFIGS: tuple[str, ...] = tuple(sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")))
"""The names `shipped_config` takes, e.g. llama2-7b-gqa8 (the files' names without .yaml)."""


def shipped_config(name: str) -> Path:
    """The run config shipped as `name` (llama2-7b-gqa8 or llama2-7b-gqa8.yaml); an unknown name is refused
    with the shipped names and the closest one."""
    stem = name.strip().removesuffix(".yaml").removesuffix(".yml")
    if stem in SHIPPED_CONFIGS:
        return SHIPPED_DIR / f"{stem}.yaml"
    close = difflib.get_close_matches(stem, SHIPPED_CONFIGS, n=1, cutoff=0.4)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UptrainError(f"no shipped config named {name!r}; {hint}uptrain ships {', '.join(SHIPPED_CONFIGS)}")
