"""The budget of a run, resolved: tokens, optimizer steps, batch geometry, FLOPs and GPU-hours.

Training FLOPs follow the usual 6·N·D estimate (forward 2·N·D, backward 4·N·D) with N the
parameters that take part in matrix multiplies — the input embedding table is a lookup and
is left out unless it is tied to the output head, whose matmul over the vocabulary is real
compute whichever tensor holds its weight — and D the tokens trained on. The same 6·N per
token gives the MFU logged on GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.training.config import BudgetConfig
from uptrain_gqa.units import format_count


@dataclass(frozen=True)
class TrainBudget:
    """What a run will do, resolved from the budget and batch settings."""

    requested_tokens: int
    """Tokens the budget asks for."""
    steps: int
    """Optimizer steps: the requested tokens rounded up to whole global batches."""
    seq_len: int
    global_batch_size: int
    """Sequences per optimizer step, over all processes."""
    micro_batch_size: int
    """Sequences per forward/backward on one process."""
    num_processes: int
    grad_accum: int
    """Micro-batches each process accumulates per optimizer step."""
    params: int
    """N: parameters that do matrix multiplies."""
    gpu_peak_tflops: float
    assumed_mfu: float
    tied_embeddings: bool = False
    """The output head is the input embedding table (N then holds it once, as the head)."""

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def tokens(self) -> int:
        """Tokens actually trained on (whole steps)."""
        return self.steps * self.global_batch_tokens

    @property
    def flops(self) -> float:
        """Training FLOPs, 6·N·D."""
        return 6.0 * self.params * self.tokens

    @property
    def gpu_hours(self) -> float:
        return self.flops / (self.gpu_peak_tflops * 1e12 * self.assumed_mfu) / 3600.0

    @property
    def counted(self) -> str:
        """What N counts, in words."""
        if self.tied_embeddings:
            return "all of them; the embedding table is tied to the output head, whose matmul is real compute"
        return "all but the input embedding table, a lookup"

    def lines(self) -> list[str]:
        return [
            f"tokens           {self.tokens:,} ({format_count(self.tokens)}; requested {self.requested_tokens:,})",
            f"optimizer steps  {self.steps:,}",
            f"global batch     {self.global_batch_size} sequences x {self.seq_len} = "
            f"{self.global_batch_tokens:,} tokens",
            f"per process      {self.micro_batch_size} sequences x {self.grad_accum} accumulation steps "
            f"x {self.num_processes} process(es)",
            f"parameters (N)   {self.params:,} ({format_count(self.params)}: {self.counted})",
            f"training FLOPs   {self.flops:.3e} (6·N·D)",
            f"GPU-hours        {self.gpu_hours:,.1f} at {self.gpu_peak_tflops:g} TFLOP/s peak and "
            f"{self.assumed_mfu:.0%} MFU",
        ]


def resolve_tokens(tokens: float | None, fraction: float | None, original_tokens: float | None, steps: int | None,
                   global_batch_tokens: int) -> int:  # fmt: skip
    """The token budget, from exactly one of: tokens, fraction x original_tokens, steps."""
    if tokens is not None:
        return int(tokens)
    if fraction is not None:
        assert original_tokens is not None
        return round(fraction * original_tokens)
    if steps is not None:
        return steps * global_batch_tokens
    raise UptrainError("budget needs one of: tokens, fraction (with original_tokens), steps")


FULL_BATCH_TOKENS = 2**20
"""Tokens per optimizer step by default for a model of FULL_BATCH_PARAMS parameters or more."""
FULL_BATCH_PARAMS = 7e9


def default_global_batch(params: int, seq_len: int, per_step: int) -> int:
    """batch.global_batch_size when it is not set: FULL_BATCH_TOKENS scaled down by the model's size below
    FULL_BATCH_PARAMS (a 135M model takes ~20k tokens per step, so a short budget still makes many steps), in
    whole micro-batches over the processes (`per_step` sequences each)."""
    tokens = FULL_BATCH_TOKENS * min(1.0, params / FULL_BATCH_PARAMS)
    return max(1, math.ceil(tokens / seq_len / per_step)) * per_step


def train_budget(
    budget: BudgetConfig,
    *,
    seq_len: int,
    global_batch_size: int,
    micro_batch_size: int,
    num_processes: int,
    params: int,
    tied_embeddings: bool = False,
) -> TrainBudget:
    """The run's budget (the config's tokens, fraction or steps) resolved for its batch geometry and model."""
    per_step = micro_batch_size * num_processes
    if global_batch_size % per_step:
        raise UptrainError(
            f"batch.global_batch_size {global_batch_size} is not a multiple of micro_batch_size x processes "
            f"= {micro_batch_size} x {num_processes} = {per_step}; adjust one of them"
        )
    gbt = global_batch_size * seq_len
    requested = resolve_tokens(budget.tokens, budget.fraction, budget.original_tokens, budget.steps, gbt)
    return TrainBudget(
        requested_tokens=requested,
        steps=max(1, math.ceil(requested / gbt)),
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        num_processes=num_processes,
        grad_accum=global_batch_size // per_step,
        params=params,
        gpu_peak_tflops=budget.gpu_peak_tflops,
        assumed_mfu=budget.assumed_mfu,
        tied_embeddings=tied_embeddings,
    )


def mfu(tokens_per_second: float, params: int, peak_tflops: float, num_processes: int) -> float:
    """Model FLOPs utilisation: achieved 6·N FLOPs per token over the processes' peak."""
    return 6.0 * params * tokens_per_second / (peak_tflops * 1e12 * num_processes)
