"""Resumable step checkpoints: written aside and renamed, rotated, found again on `--resume`.

A checkpoint is the run's saved state (model, optimizer, schedule, RNG states, and the `TrainState`
registered with accelerate; the run's parallelism, uptrain_gqa.training.parallel, writes them), the
resolved config, and train_state.json (step, tokens, time) in OUT/checkpoints/step-N. The data
position is a function of the step (uptrain_gqa.data.blocks), or, streamed, every process's stream
position in the `TrainState` (uptrain_gqa.data.streams), so this is all a run needs to continue
exactly (one streamed source with a shuffle buffer: see data.shuffle_buffer).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from uptrain_gqa import config as configlib
from uptrain_gqa.device import is_main_process
from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.io.folders import TRAIN_CONFIG, respect_umask, write_failure
from uptrain_gqa.model.loading import STEP_STATE_FILE
from uptrain_gqa.progress import LOGGER
from uptrain_gqa.training.config import RESUMABLE_CHANGES, TrainConfig
from uptrain_gqa.training.parallel import Parallelism
from uptrain_gqa.training.sharding import SHARDED_FOLDER

STATE_FILE = STEP_STATE_FILE  # train_state.json: how `uptrain eval` and `train` tell a step checkpoint from a model


@dataclass
class TrainState:
    """What a checkpoint adds to the accelerate state: the step, tokens seen, stream positions."""

    step: int = 0
    tokens: int = 0
    data: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.data = state["step"], state["tokens"], state.get("data")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones are hidden temp folders)."""
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's train_state.json (step, tokens), or one line saying it is damaged."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "tokens")):
            raise ValueError("no whole step and tokens in it")
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UptrainError(f"{path} is damaged ({first_line(e)}); use another checkpoint") from e
    return state


def set_aside_later(run_dir: Path, checkpoint: Path) -> Path | None:
    """Resuming from an earlier checkpoint starts a new history: the run's checkpoints of later steps (the
    abandoned history) move into checkpoints/abandoned-after-step-N-TIME/, so that `--resume auto` and
    rotation see only this history and a later save never replaces one of them. Nothing is deleted.
    Returns the folder they went to, or None when there were none."""
    step = read_state(checkpoint)["step"]
    later = [c for c in checkpoints(run_dir) if c.resolve() != checkpoint.resolve() and _step(c) > step]
    if not later:
        return None
    aside = run_dir / "checkpoints" / f"abandoned-after-step-{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for old in later:
        old.rename(aside / old.name)
    return aside


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def incomplete(checkpoint: Path) -> str | None:
    """What is missing from a step checkpoint, or None when it is whole. For a sharded (FSDP2) one: every file its
    DCP .metadata names, at least as long as the metadata says, and the RNG state of each rank that wrote one;
    checked before any process reads it (a missing shard fails inside DCP, on every rank, with a traceback)."""
    if not (checkpoint / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    shards = checkpoint / SHARDED_FOLDER
    if not shards.is_dir():
        return None
    if not (shards / ".metadata").is_file():
        return f"{SHARDED_FOLDER}/.metadata is missing"
    import torch.distributed.checkpoint as dcp

    try:
        ends: dict[str, int] = {}
        for info in dcp.FileSystemReader(str(shards)).read_metadata().storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # unpickling a cut file: EOFError, UnpicklingError, AttributeError, ...
        return f"{SHARDED_FOLDER}/.metadata is damaged ({type(e).__name__})"
    for name, end in sorted(ends.items()):
        path = shards / name
        if not path.is_file():
            return f"{SHARDED_FOLDER}/{name} is missing"
        if path.stat().st_size < end:
            return f"{SHARDED_FOLDER}/{name} is cut short ({path.stat().st_size:,} of {end:,} bytes)"
    ranks = sorted({int(m.group(1)) for name in ends if (m := re.fullmatch(r"__(\d+)_\d+\.distcp", name))})
    for rank in ranks:  # accelerate's RNG state of each rank (a missing one is skipped silently on load)
        if not (checkpoint / f"random_states_{rank}.pkl").is_file():
            return f"random_states_{rank}.pkl is missing"
    return None


def check_complete(run_dir: Path, checkpoint: Path) -> None:
    """Refuse, in one line, to resume from an incomplete checkpoint given by path, naming the latest complete one
    of the run to resume from instead."""
    damage = incomplete(checkpoint)
    if damage is None:
        return
    others = [c for c in checkpoints(run_dir) if c.resolve() != checkpoint.resolve() and incomplete(c) is None]
    instead = f"resume from {others[-1]}, the latest complete one" if others else "no other checkpoint is whole"
    raise UptrainError(f"cannot resume from {checkpoint}: it is incomplete ({damage}); {instead}")


def resume_path(run_dir: Path, resume: str | None) -> Path | None:
    """None (start), the latest complete checkpoint ('latest', or 'auto' when there is one), or a given one. An
    incomplete latest one is passed over, said in one line; a given incomplete one is refused."""
    if resume is None:
        return None
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UptrainError(f"--resume {resume}: not an uptrain checkpoint (no {STATE_FILE})")
        return path  # its files are checked by check_complete, after its kind
    found = checkpoints(run_dir)
    if not found and resume == "auto":
        return None  # nothing to resume yet: a first start (e.g. of a requeued batch job)
    if not found:
        raise UptrainError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
    damage = incomplete(found[-1])
    if damage is None:
        return found[-1]
    complete = [c for c in found[:-1] if incomplete(c) is None]
    if not complete:
        raise UptrainError(
            f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} (the latest, {found[-1].name}: {damage}); "
            "restore the missing files, or start over with --overwrite"
        )
    if is_main_process():
        LOGGER.warning(
            f"{found[-1]} is incomplete ({damage}); resuming from {complete[-1].name}, the latest complete checkpoint "
            "(the incomplete one is kept, set aside)"
        )
    return complete[-1]


def check_resumable(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume with settings that would change what the remaining steps compute."""
    try:
        saved = yaml.safe_load((checkpoint / TRAIN_CONFIG).read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UptrainError(f"{checkpoint / TRAIN_CONFIG} is damaged ({first_line(e)}); use another checkpoint") from e
    if not isinstance(saved, dict):
        raise UptrainError(
            f"{checkpoint / TRAIN_CONFIG} is damaged (not a mapping of config sections); use another checkpoint"
        )
    now = configlib.to_dict(cfg)
    diffs = [
        f"{section}.{key}"
        for section in now
        if section not in RESUMABLE_CHANGES
        for key in (now[section] if isinstance(now[section], dict) else {"": None})
        if (now[section].get(key) if isinstance(now[section], dict) else now[section])
        != ((saved.get(section) or {}).get(key) if isinstance(now[section], dict) else saved.get(section))
    ]
    if diffs:
        raise UptrainError(
            f"the config differs from the checkpoint's in {', '.join(d.rstrip('.') for d in diffs)}; "
            "resuming would not continue the same run (only budget, checkpoint, logging and out may change)"
        )


def failures_everywhere(acc: Any, failure: str | None) -> list[str]:
    """Every process's failure (None: it succeeded), gathered on all of them: a collective, which every
    process must reach, so that all stop together and each can say what went wrong where (the launcher may
    end the process that failed before it prints)."""
    if acc.num_processes == 1:
        return [failure] if failure is not None else []
    import torch.distributed as dist

    gathered: list[str | None] = [None] * acc.num_processes
    dist.all_gather_object(gathered, failure)
    ranks: dict[str, list[str]] = {}
    for rank, f in enumerate(gathered):
        if f is not None:
            ranks.setdefault(f, []).append(str(rank))
    return [f"{f} ({'ranks' if len(r) > 1 else 'rank'} {', '.join(r)})" for f, r in ranks.items()]


class Checkpointer:
    """Saves a run's checkpoints from every process (the run's parallelism writes each process's part),
    then the main process adds the config and the state file, renames the folder into place and rotates."""

    def __init__(self, acc: Any, run_dir: Path, cfg: TrainConfig, parallel: Parallelism) -> None:
        self.acc, self.run_dir, self.cfg, self.parallel = acc, run_dir, cfg, parallel

    def save(self, state: TrainState, data: Any) -> Path:
        """accelerate state + train state into checkpoints/step-N (written aside, then renamed)."""
        acc = self.acc
        folder = self.run_dir / "checkpoints"
        final = folder / f"step-{state.step:08d}"
        tmp = folder / f".step-{state.step:08d}.partial"
        if data.streaming:  # every process's stream position goes into the (main-process) file
            state.data = acc.gather_for_metrics([data.state_dict()], use_gather_object=True)
        if acc.is_main_process:
            for path in (tmp, final):  # a link put in their place is removed, never written through
                if path.is_symlink():
                    path.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
        acc.wait_for_everyone()
        # Each phase's failure (a full disk, a quota) is agreed on by every process before the next
        # collective, so that all stop together with one message and the previous checkpoint intact.
        for write in self.parallel.checkpoint_writes(tmp):
            self._agreed(final, tmp, write)
        acc.wait_for_everyone()
        self._agreed(final, tmp, lambda: self._finish(tmp, state) if acc.is_main_process else None)
        if acc.is_main_process:
            tmp.rename(final)
            for old in checkpoints(self.run_dir)[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _finish(self, tmp: Path, state: TrainState) -> None:
        configlib.dump(self.cfg, tmp / TRAIN_CONFIG)
        info = {"step": state.step, "tokens": state.tokens, "time": time.time()}
        (tmp / STATE_FILE).write_text(json.dumps(info) + "\n")
        respect_umask(tmp)  # accelerate writes the weights 0600

    def _agreed(self, final: Path, tmp: Path, write: Callable[[], Any]) -> None:
        """Run one phase of writing a checkpoint on every process; when it failed on any of them, remove
        the partial checkpoint and raise UptrainError on all of them."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        reason: str | None = None
        try:
            write()
        except (Exception, CheckpointException) as e:  # torch, safetensors and DCP raise many types
            reason = write_failure(e, final.parent) or f"{type(e).__name__}: {first_line(e)}"
        reasons = failures_everywhere(self.acc, reason)
        if not reasons:
            return
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        latest = self.latest()
        kept = "; no checkpoint was saved yet"
        if latest is not None:
            kept = f", then resume from {latest.name}, which is intact"
        raise UptrainError(
            f"cannot write checkpoint {final.name} in {final.parent}: {'; '.join(reasons)}; "
            f"make room or lower checkpoint.keep{kept}"
        )

    def load(self, checkpoint: Path) -> None:
        """Every process reads its part of `checkpoint` back (and the train state, RNG, schedule)."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            self.parallel.load(checkpoint)
        except UptrainError:
            raise
        except (Exception, CheckpointException) as e:  # a truncated optimizer.bin, a missing shard, ...: many types
            raise UptrainError(
                f"cannot resume from {checkpoint}: it is damaged ({type(e).__name__}: {first_line(e)}); resume from an "
                "earlier checkpoint with --resume PATH"
            ) from e

    def latest(self) -> Path | None:
        found = checkpoints(self.run_dir)
        return found[-1] if found else None
