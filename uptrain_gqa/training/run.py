"""A training run from its config: checks, the budget, the run folder, then the loop.

Everything that can fail on a bad input (config, data files, model, tokenizer, teacher, batch
geometry, a run folder that already holds a run) fails here before any work starts.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uptrain_gqa import config as configlib
from uptrain_gqa.device import multi_process_cpu
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import MARKERS, write_file
from uptrain_gqa.io.ownership import OutputLock, check_not_input, check_replaceable
from uptrain_gqa.progress import LOGGER, PLAIN
from uptrain_gqa.training.budget import TrainBudget, train_budget
from uptrain_gqa.training.checkpointer import (
    TRAIN_CONFIG,
    check_complete,
    check_resumable,
    checkpoints,
    resume_path,
    set_aside_later,
)
from uptrain_gqa.training.config import SHIPPED_CONFIGS, TrainConfig, shipped_config
from uptrain_gqa.training.loop import Trainer
from uptrain_gqa.training.parallel import claim_parallelism
from uptrain_gqa.training.preflight import fit_to_model, preflight


def _inputs(cfg: TrainConfig) -> tuple[str | None, ...]:
    return (cfg.model.path, cfg.model.config, cfg.model.tokenizer, cfg.distill.teacher)


def check_run_folder(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> None:
    """For a run that starts (not resumes): the run folder may be new or empty, or, with --overwrite,
    one uptrain made that holds none of the inputs."""
    if not run_dir.exists():
        return
    if overwrite:
        check_replaceable(run_dir, MARKERS, _inputs(cfg))
        return
    if not run_dir.is_dir():
        raise UptrainError(f"out {run_dir} exists and is not a folder; choose another out")
    if checkpoints(run_dir) or (run_dir / "model").exists():
        raise UptrainError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    if any(run_dir.iterdir()) and not (run_dir / TRAIN_CONFIG).is_file():
        raise UptrainError(f"out {run_dir} is a folder uptrain did not make (no {TRAIN_CONFIG}); choose another out")


@dataclass
class TrainResult:
    """What a training run did (a dry run: its budget only)."""

    config: TrainConfig
    """The resolved config the run ran with (values fitted to the model included)."""
    budget: TrainBudget
    """Tokens, steps, batch, FLOPs and GPU-hours of the run."""
    step: int | None = None
    """The last optimizer step (None for a dry run)."""
    tokens: int | None = None
    """Tokens trained on."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last logged metrics (loss, val_loss, val_ppl, lr, grad_norm, ...)."""

    @property
    def model(self) -> Path:
        """The final model's folder (loads with AutoModelForCausalLM.from_pretrained)."""
        return Path(self.config.out) / "model"

    def to_json(self) -> dict[str, Any]:
        """What `uptrain train --json` prints."""
        if self.step is None:
            return {"budget": asdict(self.budget)}
        return {"step": self.step, "tokens": self.tokens, **self.metrics}


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path | None = None,
    /,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Continue pretraining as `config` says (see `uptrain train --help`): a TrainConfig, a mapping of its
    sections, a YAML file, or the name of a config uptrain ships (`llama2-7b-gqa8`); `overrides` set keys on
    top of it, dotted or as sections: `train("run.yaml", **{"optim.lr": 1e-4}, budget={"steps": 100})`.
    Raises UptrainError on bad inputs and `Stopped` when a signal or a non-finite loss ends the run early
    (after saving a checkpoint)."""
    if isinstance(config, TrainConfig):
        data = configlib.to_dict(config)
    elif isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
    elif config is None or isinstance(config, (str, Path)):
        if isinstance(config, str) and not Path(config).exists() and config.removesuffix(".yaml") in SHIPPED_CONFIGS:
            config = shipped_config(config)
        data = configlib.to_dict(configlib.load(TrainConfig, config)) if config is not None else {}
    else:
        raise UptrainError(f"train takes a TrainConfig, a mapping or a YAML path, got {type(config).__name__}")
    for key, value in overrides.items():
        if "." not in key and isinstance(value, Mapping) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # a section: its keys on top of the config's
        else:
            configlib.set_dotted(data, key, value)
    return run_training(configlib.from_dict(TrainConfig, data), resume=resume, overwrite=overwrite, dry_run=dry_run)


def run_training(
    cfg: TrainConfig, *, resume: str | None = None, overwrite: bool = False, dry_run: bool = False
) -> TrainResult:
    """Train as `cfg` says. Raises UptrainError on bad inputs and failed steps (a non-finite loss included), and
    `Stopped` when a signal ends the run early (after saving a checkpoint)."""
    from accelerate import PartialState

    cfg, fitted = fit_to_model(cfg)  # before the checkpoint's config is compared: the values it ran with
    run_dir = Path(cfg.out)
    check_not_input(run_dir, _inputs(cfg))  # a run writes checkpoints, metrics and model/ into its folder
    checkpoint = resume_path(run_dir, resume)
    if checkpoint is not None:
        check_resumable(cfg, checkpoint)
    elif not dry_run:
        check_run_folder(cfg, run_dir, overwrite)
    parallel = claim_parallelism()  # before accelerate's state is built
    if checkpoint is not None:
        parallel.check_resume(checkpoint)
        check_complete(run_dir, checkpoint)  # every rank's shard there: found before any process reads one
    parallel.check(cfg.mixed_precision)  # before any work
    models, tokenizer = preflight(cfg)
    state = PartialState(cpu=multi_process_cpu())
    # rank 0 owns the run folder for the whole run: a second train on it refuses at once
    lock = OutputLock(run_dir) if state.is_main_process and not dry_run else None
    made = _missing_parents(run_dir) if lock is not None else []
    try:
        if lock is not None:
            run_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        if lock is not None and checkpoint is None:
            check_run_folder(cfg, run_dir, overwrite)  # again: another run may have started since
        if lock is not None and checkpoint is not None and not dry_run:
            aside = set_aside_later(run_dir, checkpoint)
            if aside is not None:
                LOGGER.warning(f"resuming from {checkpoint.name} starts a new history; the run's later checkpoints "
                               f"moved to {aside}")  # fmt: skip
        budget = train_budget(
            cfg.budget,
            seq_len=cfg.data.seq_len,  # type: ignore[arg-type]  # fitted above
            global_batch_size=cfg.batch.global_batch_size,  # type: ignore[arg-type]
            micro_batch_size=cfg.batch.micro_batch_size,
            num_processes=state.num_processes,
            params=models.matmul_params,
            tied_embeddings=models.tied_embeddings,
        )
        if state.is_main_process:
            lines = ["uptrain train budget:", *("  " + line for line in budget.lines())]
            lines += [f"  unset, fitted to the model: {note}" for note in fitted]
            LOGGER.info("\n".join(lines), extra=PLAIN)
        if dry_run:
            return TrainResult(cfg, budget)
        return _train(cfg, run_dir, checkpoint, overwrite, state, (budget, models, tokenizer, parallel))
    except BaseException:
        if lock is not None:
            lock.release()  # its file lies in the parent folder
            if not run_dir.exists():  # nothing of the run is left: neither are the parent folders made for it
                _remove_empty(made)
        raise
    finally:
        if lock is not None:
            lock.release()


def _missing_parents(run_dir: Path) -> list[Path]:
    """The parent folders of `run_dir` that do not exist yet, deepest first."""
    return [p for p in run_dir.absolute().parents if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: made by this run, and nothing put there since."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _train(
    cfg: TrainConfig, run_dir: Path, checkpoint: Path | None, overwrite: bool, state: Any, parts: tuple
) -> TrainResult:
    budget, models, tokenizer, parallel = parts
    created, before = False, set()  # what the run folder held before this run (main process)
    if state.is_main_process:
        if overwrite and checkpoint is None and run_dir.exists():
            shutil.rmtree(run_dir)
        created = not run_dir.exists()
        before = set() if created else {p.name for p in run_dir.iterdir()}
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_file(run_dir / TRAIN_CONFIG, configlib.dumps(cfg).encode(), "the run's config")  # never via a link
        except BaseException:
            _remove_made(run_dir, created, before)
            raise
    state.wait_for_everyone()
    trainer = None
    try:
        trainer = Trainer(cfg, budget, models, tokenizer, checkpoint, parallel)
        last = trainer.run()
    except BaseException:
        # a fresh run that failed before its first optimizer step trained nothing: what it made goes again
        if checkpoint is None and state.is_main_process and (trainer is None or trainer.state.step == 0):
            _remove_made(run_dir, created, before)
        raise
    return TrainResult(cfg, budget, last.pop("step"), last.pop("tokens"), last)


def _remove_made(run_dir: Path, created: bool, before: set[str]) -> None:
    """Remove the run folder this run created, or, in a folder that was there (empty, or holding only an earlier
    start's config), what this run added to it."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        if path.name not in before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
