"""`uptrain train`: continued pretraining ("uptraining") with accelerate, on 1 CPU to many GPUs.

One optimizer step = every process runs `grad_accum` micro-batches under
`accelerator.accumulate`, then the optimizer and the LR schedule step once. The state of a run
is the step and the tokens seen; the data position is a function of the step (see
`uptrain.data`), so a checkpoint (model, optimizer, schedule, RNG states, train state, saved
with `accelerator.save_state`) resumes the run exactly. SIGTERM/SIGINT ask for a checkpoint at
the end of the current step and a clean exit; a non-finite loss stops the run before it can
overwrite a good checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml

from uptrain import config as configlib
from uptrain.budget import Plan, make_plan, mfu
from uptrain.data import BlockData, StreamData, expand_files, prepare
from uptrain.errors import UptrainError
from uptrain.losses import training_loss
from uptrain.modeling import (
    RunModel,
    build_optimizer,
    build_scheduler,
    load_model,
    load_teacher,
    preflight,
    save_final_model,
)
from uptrain.train_config import RESUMABLE_CHANGES, TrainConfig

CONFIG_NAME = "uptrain_train.yaml"
METRICS = "metrics.jsonl"


class StopRun(Exception):
    """The run ended early: `code` is the exit status, the message says why and what to do."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


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


class _Signals:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._previous:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones are hidden temp folders)."""
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def _resume_path(run_dir: Path, resume: str | None) -> Path | None:
    """None (start), the latest checkpoint ('latest', or 'auto' when there is one), or a given one."""
    if resume is None:
        return None
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise UptrainError(f"--resume {resume}: not an uptrain checkpoint (no train_state.json)")
        return path
    found = checkpoints(run_dir)
    if not found and resume == "auto":
        return None  # nothing to resume yet: a first start (e.g. of a requeued batch job)
    if not found:
        raise UptrainError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
    return found[-1]


def _check_resumable(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume with settings that would change what the remaining steps compute."""
    saved = yaml.safe_load((checkpoint / CONFIG_NAME).read_text())
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


def _multi_cpu() -> bool:
    """Launched as several processes on a machine without GPUs: accelerate needs cpu=True to
    join them into one gloo group instead of running each alone."""
    import os

    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return max(int(os.environ.get(k, "1")) for k in sizes) > 1 and not torch.cuda.is_available()


def _sharding_requested() -> bool:
    import os

    return any(os.environ.get(k, "").lower() == "true" for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def _trackers(names: list[str]) -> list[str]:
    from accelerate.utils import is_tensorboard_available

    return [n for n in names if n != "tensorboard" or is_tensorboard_available()]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Run:
    """One training run: accelerate objects, data, state, and the loop's helpers."""

    def __init__(self, cfg: TrainConfig, plan: Plan, models: RunModel, tokenizer: Any, resume: Path | None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

        self.cfg, self.plan, self.tokenizer = cfg, plan, tokenizer
        self.run_dir = Path(cfg.out)
        precision = cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.acc = Accelerator(
            cpu=_multi_cpu(),
            mixed_precision=precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=plan.grad_accum, sync_with_dataloader=False, adjust_scheduler=False
            ),
            log_with=_trackers(cfg.logging.trackers) or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        )
        acc = self.acc
        if acc.distributed_type.name == "MULTI_CPU" and _sharding_requested():
            self.log("note: FSDP and DeepSpeed need GPUs; on this CPU-only machine the run is plain data parallel")
        set_seed(cfg.seed)  # the initialisation of a model from scratch, and everything after it
        with acc.main_process_first():  # one process downloads / loads into the cache first
            model = load_model(cfg.model, models)
            teacher = load_teacher(cfg.distill, cfg.model) if cfg.distill.teacher else None
        self.data: BlockData | StreamData = prepare(
            cfg.data,
            tokenizer,
            seed=cfg.seed,
            micro_batch_size=cfg.batch.micro_batch_size,
            rank=acc.process_index,
            world=acc.num_processes,
            main_process_first=acc.main_process_first,
        )
        optimizer = build_optimizer(model, cfg.optim, acc.device)
        scheduler = build_scheduler(optimizer, cfg.optim, plan.steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.teacher = acc.prepare_model(teacher, evaluation_mode=True) if teacher is not None else None
        self.state = TrainState()
        acc.register_for_checkpointing(self.state)
        if resume is not None:
            acc.load_state(str(resume))
            if self.state.data is not None:
                self.data.load_state_dict(self.state.data[acc.process_index])
            self.log(f"resumed from {resume} at step {self.state.step:,} ({self.state.tokens:,} tokens)")

    # --- output ----------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.acc.is_main_process:
            print(text, file=sys.stderr, flush=True)

    def record(self, metrics: dict[str, float]) -> None:
        self.acc.log(metrics, step=self.state.step)
        if self.acc.is_main_process:
            row = {"step": self.state.step, "tokens": self.state.tokens, **metrics}
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    # --- the loop --------------------------------------------------------------------------

    def step(self) -> tuple[float, float, float]:
        """One optimizer step over every process's micro-batches: (mean loss, mean CE, grad norm)."""
        acc, cfg = self.acc, self.cfg
        losses, ces = [], []
        grad_norm = torch.tensor(float("nan"))
        for micro in range(self.plan.grad_accum):
            ids = self.data.micro_batch(self.state.step * self.plan.grad_accum + micro).to(acc.device)
            with acc.accumulate(self.model):
                loss, ce = training_loss(self.model, ids, self.teacher, cfg.distill.weight, cfg.distill.temperature)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or math.inf)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            ces.append(ce.float())
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens += self.plan.global_batch_tokens
        return float(torch.stack(losses).mean()), float(torch.stack(ces).mean()), float(grad_norm)

    def agree(self, loss: float, ce: float, stop: bool) -> tuple[float, float, bool]:
        """One collective per step: mean loss and CE over processes, and whether any wants to stop."""
        t = torch.tensor([loss, ce, float(stop)], device=self.acc.device, dtype=torch.float64)
        t = self.acc.reduce(t, "sum") if self.acc.num_processes > 1 else t
        n = self.acc.num_processes
        return float(t[0]) / n, float(t[1]) / n, bool(t[2] > 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.acc.device)  # (loss sum, tokens)
        for ids in self.data.validation_batches(self.cfg.batch.micro_batch_size):
            ids = ids.to(self.acc.device)
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=total.device)])
        total = self.acc.reduce(total, "sum") if self.acc.num_processes > 1 else total
        self.model.train()
        val = float(total[0] / total[1])
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def save_checkpoint(self) -> Path:
        """accelerate state + train state into checkpoints/step-N (written aside, then renamed)."""
        acc, state = self.acc, self.state
        folder = self.run_dir / "checkpoints"
        final = folder / f"step-{state.step:08d}"
        tmp = folder / f".step-{state.step:08d}.partial"
        if self.data.streaming:  # every process's stream position goes into the (main-process) file
            state.data = acc.gather_for_metrics([self.data.state_dict()], use_gather_object=True)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            configlib.dump(self.cfg, tmp / CONFIG_NAME)
            info = {"step": state.step, "tokens": state.tokens, "time": time.time()}
            (tmp / "train_state.json").write_text(json.dumps(info) + "\n")
            tmp.rename(final)
            for old in checkpoints(self.run_dir)[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def run(self) -> dict[str, Any]:
        acc, cfg, plan = self.acc, self.cfg, self.plan
        acc.init_trackers(cfg.logging.project, config=_flat(configlib.to_dict(cfg)))
        from tqdm.auto import tqdm

        signals = _Signals()
        bar = tqdm(total=plan.steps, initial=self.state.step, unit="step", disable=not acc.is_main_process)
        self.model.train()
        last: dict[str, float] = {}
        try:
            if self.state.step == 0:
                last |= self.evaluate()
                self.record(last)
            window_start, window_steps = time.perf_counter(), 0
            while self.state.step < plan.steps:
                loss, ce, grad_norm = self.step()
                loss, ce, stop = self.agree(loss, ce, signals.received is not None)
                window_steps += 1
                if not math.isfinite(loss):
                    kept = checkpoints(self.run_dir)
                    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
                    raise StopRun(
                        f"the loss became {loss} at step {self.state.step}; stopped without saving ({where}). "
                        "Lower optim.lr, check the data, or resume from that checkpoint",
                        code=1,
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                step = self.state.step
                if step % cfg.logging.every == 0 or step == plan.steps:
                    elapsed = time.perf_counter() - window_start
                    tps = window_steps * plan.global_batch_tokens / max(elapsed, 1e-9)
                    last = {
                        "loss": loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens_per_s": tps,
                        "mfu": mfu(tps, plan.params, cfg.budget.gpu_peak_tflops, acc.num_processes),
                    }
                    if self.teacher is not None:  # the loss mixes in the KL term: show the CE alone too
                        last["ce"] = ce
                    self.record(last)
                    window_start, window_steps = time.perf_counter(), 0
                if step == plan.steps or (cfg.logging.eval_every and step % cfg.logging.eval_every == 0):
                    metrics = self.evaluate()
                    last |= metrics
                    self.record(metrics)
                    bar.set_postfix(loss=f"{loss:.4f}", val=f"{metrics['val_loss']:.4f}")
                saving = step == plan.steps or stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                if saving:
                    path = self.save_checkpoint()
                if stop:
                    name = signal.Signals(signals.received or signal.SIGTERM).name
                    raise StopRun(
                        f"stopped by {name} at step {step}: checkpoint saved to {path}; "
                        f"continue with `uptrain train ... --resume`",
                        code=128 + int(signals.received or signal.SIGTERM),
                    )
                if window_steps == 0:  # logging/eval/checkpoint time is not training time
                    window_start = time.perf_counter()
        except BaseException:
            acc.end_training()
            raise
        finally:
            bar.close()
            signals.restore()
        save_final_model(acc, self.model, self.tokenizer, cfg, self.run_dir / "model", CONFIG_NAME)
        acc.end_training()  # closes the trackers and the process group: after the last collective
        self.log(f"model saved to {self.run_dir / 'model'}")
        return {"step": self.state.step, "tokens": self.state.tokens, **last}


def train(
    config: str,
    *,
    dry_run: bool = False,
    resume: Annotated[str | None, {"nargs": "?", "const": "latest", "metavar": "CHECKPOINT"}] = None,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Continue pretraining a (converted) checkpoint for a token budget, with accelerate.

    Runs on the local device (a GPU if present, else the CPU). The same command runs under
    `accelerate launch` or `torchrun` for several GPUs or nodes (see configs/accelerate/).
    Any config key can be overridden on the command line, e.g. --optim.lr=1e-4
    --budget.tokens=2e9. The resolved config is saved in the run folder and in every
    checkpoint; metrics go to OUT/metrics.jsonl (and to the configured trackers); the final
    model is written to OUT/model as a Hugging Face folder.

    Args:
        config: YAML file with the run's config (see configs/ and the keys below).
        dry_run: Print the resolved plan (tokens, steps, batch, FLOPs, GPU-hours) and exit.
        resume: Continue from the latest checkpoint in OUT/checkpoints, or from CHECKPOINT;
            `--resume auto` resumes if there is a checkpoint and starts afresh otherwise.
        overwrite: Delete an existing run folder (checkpoints, metrics, model) and start over.
        overrides: --section.key=value settings applied on top of CONFIG.
    """
    cfg = configlib.load(TrainConfig, config, configlib.parse_overrides(overrides or []))
    from accelerate import PartialState

    run_dir = Path(cfg.out)
    checkpoint = _resume_path(run_dir, resume)
    if checkpoint is not None:
        _check_resumable(cfg, checkpoint)
    elif not dry_run and (checkpoints(run_dir) or (run_dir / "model").exists()) and not overwrite:
        raise UptrainError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    models, tokenizer = preflight(cfg)
    state = PartialState(cpu=_multi_cpu())
    plan = make_plan(
        tokens=cfg.budget.tokens,
        fraction=cfg.budget.fraction,
        original_tokens=cfg.budget.original_tokens,
        steps=cfg.budget.steps,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.batch.global_batch_size,
        micro_batch_size=cfg.batch.micro_batch_size,
        num_processes=state.num_processes,
        params=models.matmul_params,
        gpu_peak_tflops=cfg.budget.gpu_peak_tflops,
        assumed_mfu=cfg.budget.assumed_mfu,
    )
    if state.is_main_process:
        print("\n".join(["uptrain train plan:", *("  " + line for line in plan.lines())]), file=sys.stderr)
    if dry_run:
        return {"plan": plan}
    if state.is_main_process:
        if overwrite and checkpoint is None and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        configlib.dump(cfg, run_dir / CONFIG_NAME)
    state.wait_for_everyone()
    try:
        return Run(cfg, plan, models, tokenizer, checkpoint).run()
    except StopRun as e:
        if state.is_main_process:
            print(f"uptrain train: {e}", file=sys.stderr)
        raise SystemExit(e.code) from None


def _epilog() -> str:
    return "config keys (YAML sections, or --section.key=value overrides):\n" + "\n".join(
        configlib.describe(TrainConfig)
    )


train.cli_epilog = _epilog  # type: ignore[attr-defined]

__all__ = ["TrainState", "checkpoints", "expand_files", "train"]
