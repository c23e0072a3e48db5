"""How a run spreads over its processes, decided once per run: `Replicated` or `FullyShard`.

The loop and the checkpointer ask the object `claim_parallelism` returns to wrap the model, sync
and clip the gradients, write and read the model and optimizer of a step checkpoint, gather the
final weights and tear down; neither asks which one it is.

- `Replicated`: one process, or DDP over several; accelerate prepares the model, optimizer and
  schedule and saves them in its state.
- `FullyShard`: FSDP2, torch's `fully_shard`, applied by uptrain (uptrain_gqa.training.sharding);
  accelerate still starts the processes, places the data, accumulates, logs and saves the schedule,
  RNG and train state, while uptrain shards the model, steps the optimizer and writes the model and
  optimizer as DCP shards.

Why uptrain, not accelerate, shards: `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
announces FSDP through ACCELERATE_USE_FSDP and FSDP_* variables, and accelerate, seeing
ACCELERATE_USE_FSDP, runs its own FSDP only on GPUs (a multi-process CPU state stays plain data
parallel). So `claim_parallelism` reads the FSDP_* settings and removes ACCELERATE_USE_FSDP before
the first accelerate state is built: one code path then runs over NCCL on GPUs and over gloo on
CPUs, which is why CI can test it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.device import autocast_precision
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.training.config import ModelConfig
from uptrain_gqa.training.model import compile_layers
from uptrain_gqa.training.sharding import (
    SHARDED_FOLDER,
    ShardedState,
    ShardingPlan,
    clip_grad_norm,
    full_state_dict,
    local_fraction,
    mixed_precision_policy,
    shard_model,
    tied_names,
)

Optimize = Callable[[torch.nn.Module], tuple[torch.optim.Optimizer, Any]]
"""Builds the optimizer and LR schedule of the model it is given (the wrapped one, where wrapping replaces the
parameters)."""


class Parallelism(ABC):
    """What the loop and the checkpointer ask of a run's parallel strategy."""

    name: str
    """How uptrain_run.json names it ("sharding")."""

    @abstractmethod
    def check(self, mixed_precision: str) -> None:
        """Refuse, before any work, a run config this strategy cannot run."""

    @abstractmethod
    def check_resume(self, checkpoint: Path) -> None:
        """Refuse a step checkpoint another strategy wrote."""

    @abstractmethod
    def accelerator_precision(self, precision: str) -> str:
        """accelerate's mixed_precision for the run's `precision`."""

    @abstractmethod
    def loads_on_meta(self, main_process: bool) -> bool:
        """Whether this process builds the model without weights (they come from rank 0)."""

    @abstractmethod
    def prepare(
        self,
        acc: Any,
        model: torch.nn.Module,
        teacher: torch.nn.Module | None,
        m: ModelConfig,
        precision: str,
        optimize: Optimize,
        log: Callable[[str], None],
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, torch.nn.Module | None]:
        """(model, optimizer, schedule, teacher), wrapped and placed for training; compiles the layers with
        model.compile. The teacher is only placed or sharded, never registered with accelerate, whose
        save_state would write it into every checkpoint."""

    @abstractmethod
    def set_gradient_sync(self, sync: bool) -> None:
        """Inside `accelerator.accumulate`, before the backward: whether this micro-batch reduces the gradients."""

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients by one global norm over every process; returns the norm before clipping."""

    @abstractmethod
    def checkpoint_writes(self, folder: Path) -> list[Callable[[], None]]:
        """The phases that write a step checkpoint into `folder`, each on every process; a failure in one is
        agreed on by all before the next collective."""

    @abstractmethod
    def load(self, folder: Path) -> None:
        """Every process reads its part of a step checkpoint back (model, optimizer, schedule, RNG, train state)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the main process (a collective)."""

    @abstractmethod
    def end(self) -> None:
        """Free what must go before the process group does; the caller has dropped its own model reference."""


def claim_parallelism(environ: MutableMapping[str, str] = os.environ) -> Parallelism:
    """The strategy the launcher asked for; call it before the first accelerate state is built."""
    plan = claim_sharding(environ)
    return Replicated() if plan is None else FullyShard(plan)


def _flag(environ: MutableMapping[str, str], key: str, default: bool) -> bool:
    return environ.get(key, str(default)).lower() in ("true", "1", "yes")


def claim_sharding(environ: MutableMapping[str, str] = os.environ) -> ShardingPlan | None:
    """The FSDP2 plan the launcher asked for (None for plain data parallel), taken over from accelerate (see the
    module's docstring): removes ACCELERATE_USE_FSDP. Raises UptrainError for DeepSpeed and for FSDP version 1."""
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED", False):
        raise UptrainError(
            "DeepSpeed is not supported by uptrain train (it was never run end to end here); launch with "
            "--config_file configs/accelerate/fsdp2.yaml: FSDP2 shards parameters, gradients and optimizer "
            "state like ZeRO-3"
        )
    if not _flag(environ, "ACCELERATE_USE_FSDP", False):
        return None
    if environ.get("FSDP_VERSION", "1") != "2":
        raise UptrainError("FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config")
    if environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD") not in ("FULL_SHARD", "1"):
        raise UptrainError("uptrain's FSDP2 shards fully; remove fsdp_sharding_strategy or set it to FULL_SHARD")
    classes = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    plan = ShardingPlan(
        reshard_after_forward=_flag(environ, "FSDP_RESHARD_AFTER_FORWARD", True),
        offload_params=_flag(environ, "FSDP_OFFLOAD_PARAMS", False),
        cpu_ram_efficient_loading=_flag(environ, "FSDP_CPU_RAM_EFFICIENT_LOADING", True),
        activation_checkpointing=_flag(environ, "FSDP_ACTIVATION_CHECKPOINTING", False),
        layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
    )
    environ.pop("ACCELERATE_USE_FSDP", None)
    return plan


class Replicated(Parallelism):
    """One process, or DDP over several: accelerate prepares the model, optimizer and schedule, syncs the
    gradients on the last micro-batch (`accumulate`), clips, and saves all of them in its state."""

    name = "replicated"

    def __init__(self) -> None:
        self.acc: Any = None
        self.model: Any = None
        self.unwrapped: torch.nn.Module | None = None

    def check(self, mixed_precision: str) -> None:
        pass  # every precision of the run config is accelerate's

    def check_resume(self, checkpoint: Path) -> None:
        if (checkpoint / SHARDED_FOLDER).exists():
            raise UptrainError(
                f"{checkpoint} is a sharded (FSDP2) checkpoint: resume it under the launcher it was saved with "
                "(accelerate launch --config_file configs/accelerate/fsdp2.yaml ...), or `uptrain export` it"
            )

    def accelerator_precision(self, precision: str) -> str:
        return precision

    def loads_on_meta(self, main_process: bool) -> bool:
        return False

    def prepare(
        self,
        acc: Any,
        model: torch.nn.Module,
        teacher: torch.nn.Module | None,
        m: ModelConfig,
        precision: str,
        optimize: Optimize,
        log: Callable[[str], None],
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, torch.nn.Module | None]:
        if m.compile:
            compile_layers(model)
        self.acc, self.unwrapped = acc, model  # the model accelerate saves, unwrapped: its tied weights stored once
        optimizer, scheduler = optimize(model)
        self.model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        return self.model, optimizer, scheduler, teacher.to(acc.device) if teacher is not None else None

    def set_gradient_sync(self, sync: bool) -> None:
        pass  # accelerate's `accumulate` skips DDP's all-reduce but on the last micro-batch

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.acc.clip_grad_norm_(self.model.parameters(), max_norm)

    def checkpoint_writes(self, folder: Path) -> list[Callable[[], None]]:
        return [lambda: self._save_state(folder)]

    def _save_state(self, folder: Path) -> None:
        with _quiet_expected_ties(self.unwrapped):
            self.acc.save_state(str(folder))

    def load(self, folder: Path) -> None:
        self.acc.load_state(str(folder))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.acc.get_state_dict(self.model)

    def end(self) -> None:
        """The data-parallel wrapper goes first: its gradient reducer holds the process group, and freed after
        the group is unregistered it would destroy gloo's group while holding the GIL, which a gloo worker
        thread finishing its last collective waits for (a hang at exit)."""
        self.model = None
        self.acc.free_memory()  # accelerate's references, then gc: cycles through hooks included


class FullyShard(Parallelism):
    """FSDP2 as `plan` says: uptrain shards the model (and a teacher), reduce-scatters the gradients once per
    optimizer step, clips over the shards and writes model and optimizer as a DCP folder, one file per rank."""

    name = "fsdp2"

    def __init__(self, plan: ShardingPlan) -> None:
        self.plan = plan
        self.acc: Any = None
        self.model: Any = None
        self.state: ShardedState | None = None

    def check(self, mixed_precision: str) -> None:
        mixed_precision_policy(autocast_precision(mixed_precision))  # refuses fp16

    def check_resume(self, checkpoint: Path) -> None:
        if not (checkpoint / SHARDED_FOLDER).exists():
            raise UptrainError(
                f"{checkpoint} is not a sharded (FSDP2) checkpoint; resume it with the launcher it was saved with"
            )

    def accelerator_precision(self, precision: str) -> str:
        """'no': the precision is the sharding's policy (bf16 compute and gathers, fp32 gradient reduction and
        master weights), which fully_shard applies; accelerate's autocast would cast a second time."""
        return "no"

    def loads_on_meta(self, main_process: bool) -> bool:
        return self.plan.cpu_ram_efficient_loading and not main_process

    def prepare(
        self,
        acc: Any,
        model: torch.nn.Module,
        teacher: torch.nn.Module | None,
        m: ModelConfig,
        precision: str,
        optimize: Optimize,
        log: Callable[[str], None],
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, torch.nn.Module | None]:
        if self.plan.activation_checkpointing and not m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        main = acc.is_main_process
        self.acc = acc
        self.model = shard_model(model, self.plan, device=acc.device, precision=precision, main_process=main)
        if m.compile:  # after sharding: FSDP2's per-layer hooks stay outside the compiled graphs
            compile_layers(self.model)
        if teacher is not None:
            teacher = shard_model(
                teacher, self.plan, device=acc.device, precision=precision, main_process=main, frozen=True
            )
        optimizer, scheduler = optimize(self.model)
        acc.register_for_checkpointing(scheduler)
        self.state = ShardedState(self.model, optimizer)
        local, total = local_fraction(self.model)
        log(
            f"FSDP2 over {acc.num_processes} processes ({acc.device.type}, precision {precision}): "
            f"this process holds {local:,} of {total:,} parameters"
        )
        return self.model, optimizer, scheduler, teacher

    def set_gradient_sync(self, sync: bool) -> None:
        self.model.set_requires_gradient_sync(sync)  # reduce-scatter once, after the last micro-batch

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self.model.parameters(), max_norm)

    def checkpoint_writes(self, folder: Path) -> list[Callable[[], None]]:
        assert self.state is not None, "prepare() first"
        state = self.state
        return [lambda: self.acc.save_state(str(folder)), lambda: state.save(folder)]

    def load(self, folder: Path) -> None:
        assert self.state is not None, "prepare() first"
        self.acc.load_state(str(folder))
        self.state.load(folder)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model, self.acc.is_main_process)

    def end(self) -> None:
        pass  # the sharded model holds no reducer: nothing must go before the process group


class _ExpectedTies(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" when every name it removed is one of the
    model's own tied weights (a head tied to the input embeddings): safetensors stores a shared tensor once,
    and loading the checkpoint into the model, which is tied, fills both names. Other sharing still warns."""

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        found = re.search(r"Removed shared tensor \{(.*?)\}", message)
        if found is None:
            return True
        removed = {name.strip().strip("'\"").removeprefix("module.") for name in found.group(1).split(",")}
        return not removed <= self.tied


@contextlib.contextmanager
def _quiet_expected_ties(model: Any) -> Iterator[None]:
    tied = {name for group in tied_names(model) for name in group} if model is not None else set()
    if not tied:
        yield
        return
    logger = logging.getLogger("accelerate.utils.other")  # where accelerate's safetensors save warns
    note = _ExpectedTies(tied)
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)
