"""The training loop: continued pretraining ("uptraining") with accelerate, on 1 CPU to many GPUs.

One optimizer step = every process runs `grad_accum` micro-batches under
`accelerator.accumulate`, then the optimizer and the LR schedule step once. The state of a run
is the step and the tokens seen; the data position is a function of the step (see
`uptrain_gqa.data.blocks`), and streamed data saves each process's stream position beside it
(`uptrain_gqa.data.streams`), so a checkpoint resumes the run exactly. SIGTERM/SIGINT ask for a
checkpoint at the end of the current step and a clean exit; a non-finite loss stops the run
before it can overwrite a good checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa import config as configlib
from uptrain_gqa.data.blocks import BlockData, prepare
from uptrain_gqa.data.config import data_sources
from uptrain_gqa.data.streams import StreamData, StreamMixture
from uptrain_gqa.device import autocast_precision, device_name, environment, multi_process_cpu
from uptrain_gqa.errors import STOP_SIGNALS, Stopped, UptrainError
from uptrain_gqa.progress import progress_bar
from uptrain_gqa.training.budget import TrainBudget, mfu
from uptrain_gqa.training.checkpointer import Checkpointer, TrainState, checkpoints
from uptrain_gqa.training.config import TrainConfig
from uptrain_gqa.training.export import save_final_model
from uptrain_gqa.training.losses import chunked_head, token_nll, training_loss
from uptrain_gqa.training.metrics import (
    LOSS_PLOT,
    METRICS,
    MetricsLog,
    available_trackers,
    can_plot,
    flat,
    plot_losses,
    record_session,
)
from uptrain_gqa.training.model import freeze_untrained, load_model, load_teacher
from uptrain_gqa.training.optimizer import build_optimizer, build_scheduler
from uptrain_gqa.training.parallel import Parallelism, Replicated
from uptrain_gqa.training.preflight import RunModel
from uptrain_gqa.version import install_hint


class StopSignals:
    """First SIGTERM/SIGINT/SIGHUP: finish the step, checkpoint, exit. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in self._previous:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Trainer:
    """One training run. Its parts: the accelerator (processes, device, precision), the parallelism
    (how the model is spread over the processes), this process's data, the model (and teacher),
    optimizer and schedule, the train state, the checkpointer and the metrics log."""

    def __init__(
        self,
        cfg: TrainConfig,
        budget: TrainBudget,
        models: RunModel,
        tokenizer: Any,
        resume: Path | None,
        parallel: Parallelism | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

        self.cfg, self.budget, self.tokenizer = cfg, budget, tokenizer
        self.parallel = parallel = parallel or Replicated()
        self.run_dir = Path(cfg.out)
        precision = autocast_precision(cfg.mixed_precision)
        trackers, skipped = available_trackers(cfg.logging.trackers)
        self.acc = acc = Accelerator(
            cpu=multi_process_cpu(),
            mixed_precision=parallel.accelerator_precision(precision),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=budget.grad_accum, sync_with_dataloader=False, adjust_scheduler=False
            ),
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        )
        self.metrics = MetricsLog(acc, self.run_dir)
        for name in skipped:
            self.metrics.log(f"uptrain train: logging.trackers: {name} is not installed, so it is skipped "
                             f"({install_hint(name)}); metrics still go to {METRICS}")  # fmt: skip
        if not can_plot():
            self.metrics.log(f"uptrain train: no {LOSS_PLOT} without matplotlib ({install_hint('plot')})")
        set_seed(cfg.seed)  # the initialisation of a model from scratch, and everything after it
        with acc.main_process_first():  # one process downloads / loads into the cache first
            on_meta = parallel.loads_on_meta(acc.is_main_process)
            model = load_model(cfg.model, models, meta=on_meta)
            teacher = load_teacher(cfg.distill, cfg.model, meta=on_meta) if cfg.distill.teacher else None
        if cfg.optim.trainable is not None:
            trained = freeze_untrained(model, cfg.optim.trainable)
            total = sum(p.numel() for p in model.parameters())
            self.metrics.log(f"optim.trainable={cfg.optim.trainable!r}: training {trained:,} of {total:,} parameters")
        self.data: BlockData | StreamData | StreamMixture = prepare(
            cfg.data,
            tokenizer,
            seed=cfg.seed,
            micro_batch_size=cfg.batch.micro_batch_size,
            rank=acc.process_index,
            world=acc.num_processes,
            main_process_first=acc.main_process_first,
        )
        self.state = TrainState()
        acc.register_for_checkpointing(self.state)
        # the model's output layer returns the hidden states, which the loss multiplies chunk by chunk
        self.head = chunked_head(model) if cfg.model.chunked_loss and not cfg.distill.teacher else None
        if self.head is not None:
            self.metrics.detail("chunked cross-entropy: the full fp32 logits are never materialised")

        def optimize(wrapped: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
            optimizer = build_optimizer(wrapped, cfg.optim, acc.device)
            return optimizer, build_scheduler(optimizer, cfg.optim, budget.steps)

        self.model, self.optimizer, self.scheduler, teacher = parallel.prepare(
            acc, model, teacher, cfg.model, precision, optimize, self.metrics.log
        )
        self.teacher = teacher  # the unchanged source, loaded again on resume, never saved
        self._teacher_bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        if teacher is not None and cfg.distill.weight > 0:
            teacher.register_forward_hook(self._watch_teacher)
            self.check_teacher()
        self.checkpointer = Checkpointer(acc, self.run_dir, cfg, parallel)
        if resume is not None:
            self.checkpointer.load(resume)
            if self.state.data is not None:  # streamed: each process's position in its own part of the data
                if len(self.state.data) != acc.num_processes:
                    raise UptrainError(
                        f"{resume} holds the stream positions of {len(self.state.data)} processes, not "
                        f"{acc.num_processes}: streamed data is split by process; resume with {len(self.state.data)}"
                    )
                self.data.load_state_dict(self.state.data[acc.process_index])
            self.metrics.log(f"resumed from {resume} at step {self.state.step:,} ({self.state.tokens:,} tokens)")
        self.metrics.start(self.state.step)

    # --- the teacher ----------------------------------------------------------------------------

    def _watch_teacher(self, module: Any, args: Any, output: Any) -> None:
        """Forward hook: remember (on the device, no sync) whether the teacher's logits were ever non-finite. A
        sum in float32 is non-finite when any logit is, without a copy of the logits."""
        logits = getattr(output, "logits", None)
        if logits is not None:
            self._teacher_bad |= ~torch.isfinite(logits.detach().sum(dtype=torch.float32))

    def _teacher_was_bad(self) -> bool:
        """Whether the teacher gave a non-finite logit on any process since the start (a collective)."""
        bad = self._teacher_bad.to(torch.float64)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, "sum")
        return bool(bad > 0)

    def _teacher_cause(self) -> str:
        return (
            f"distill.teacher {self.cfg.distill.teacher} gives non-finite logits (NaN or inf): its weights hold NaN "
            "or inf, or its values overflow in its dtype"
        )

    @torch.no_grad()
    def check_teacher(self) -> None:
        """Before the first step: the teacher's logits on one batch of held-out blocks (or, with none on this
        process, a row of token ids) are finite; a teacher with NaN weights would make every loss NaN. Every
        process takes part (a sharded teacher's forward is a collective)."""
        rows = next(iter(self._validation_rows()), None)
        ids = rows[1] if rows is not None else torch.arange(16)[None] % max(1, len(self.tokenizer))
        self.teacher(input_ids=ids.to(self.acc.device), use_cache=False)
        if self._teacher_was_bad():
            raise UptrainError(
                f"{self._teacher_cause()}, so the distillation loss would be NaN; give a teacher with finite "
                "weights (`uptrain convert` refuses such a source), or leave distill.teacher empty"
            )

    def record_session(self) -> str | None:
        """Add this start (or resume) to OUT/uptrain_run.json; returns the tracker run id all sessions share."""
        entry = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "world_size": self.acc.num_processes,
            "device": device_name(self.acc.device),
            "sharding": self.parallel.name,
            "data": data_sources(self.cfg.data),
            **environment(),
        }
        ids = self.acc.gather_for_metrics([device_name(self.acc.device)], use_gather_object=True)
        entry["devices_by_rank"] = ids
        if not self.acc.is_main_process:
            return None
        return record_session(self.run_dir, entry)["tracker_run_id"]

    def record(self, metrics: dict[str, float]) -> None:
        self.metrics.record(self.state.step, self.state.tokens, metrics)

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over every process's micro-batches: (mean loss, mean CE, grad norm), left on
        the device: reading them back would stall the host until the GPU is done, every step."""
        acc, cfg = self.acc, self.cfg
        losses, ces = [], []
        grad_norm = torch.tensor(float("nan"))
        for micro in range(self.budget.grad_accum):
            ids = self.data.micro_batch(self.state.step * self.budget.grad_accum + micro).to(acc.device)
            with acc.accumulate(self.model):
                self.parallel.set_gradient_sync(acc.sync_gradients)
                loss, ce = training_loss(
                    self.model, ids, self.teacher, cfg.distill.weight, cfg.distill.temperature, self.head
                )
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = self.parallel.clip_grad_norm(cfg.optim.grad_clip or math.inf)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            ces.append(ce.float())
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens += self.budget.global_batch_tokens
        return torch.stack(losses).mean(), torch.stack(ces).mean(), grad_norm

    def agree(self, loss: torch.Tensor, ce: torch.Tensor, stop: bool) -> tuple[float, float, bool]:
        """One collective and one read-back: mean loss and CE over processes, and whether any wants to stop."""
        flag = torch.tensor(float(stop), device=self.acc.device, dtype=torch.float64)
        t = torch.stack([loss.detach().double(), ce.detach().double(), flag])
        t = self.acc.reduce(t, "sum") if self.acc.num_processes > 1 else t
        n = self.acc.num_processes
        return float(t[0]) / n, float(t[1]) / n, bool(t[2] > 0)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and perplexity on the held-out blocks, over every process's share (and per source of a mixture)."""
        self.model.eval()
        parts = getattr(self.data, "parts", [])
        # rows: one per source (or one for all), columns: (loss sum, tokens)
        total = torch.zeros(max(1, len(parts)), 2, dtype=torch.float64, device=self.acc.device)
        for rows, ids in self._validation_rows():
            ids = ids.to(self.acc.device)
            nll = token_nll(self.model, ids, self.head)  # (B, T-1)
            for row, block_nll in zip(rows or [None] * len(ids), nll.sum(1).double(), strict=True):
                part = next((i for i, (_, r) in enumerate(parts) if row in r), 0)
                total[part, 0] += block_nll
                total[part, 1] += ids.shape[1] - 1
        total = self.acc.reduce(total, "sum") if self.acc.num_processes > 1 else total
        self.model.train()
        val = float(total[:, 0].sum() / total[:, 1].sum())
        out = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        for i, (label, _) in enumerate(parts):
            out[f"val_loss/{label}"] = float(total[i, 0] / total[i, 1])
        return out

    def _validation_rows(self) -> Any:
        b = self.cfg.batch.micro_batch_size
        if hasattr(self.data, "validation_rows"):
            return self.data.validation_rows(b)
        return ((None, ids) for ids in self.data.validation_batches(b))

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        acc, cfg, budget = self.acc, self.cfg, self.budget
        run_id = self.record_session()
        wandb = {"name": cfg.logging.run_name or self.run_dir.absolute().name, "tags": cfg.logging.tags,
                 "id": run_id, "resume": "allow"}  # fmt: skip  # a resumed run continues the same tracker run
        acc.init_trackers(cfg.logging.project, config=flat(configlib.to_dict(cfg)), init_kwargs={"wandb": wandb})
        signals = StopSignals()
        bar = progress_bar(total=budget.steps, initial=self.state.step, unit="step", disable=not acc.is_main_process)
        self.model.train()
        last: dict[str, float] = {}
        try:
            if self.state.step == 0:
                last |= self.validate()
                self.record(last)
            window_start, window_steps = time.perf_counter(), 0
            while self.state.step < budget.steps:
                loss_t, ce_t, norm_t = self.step()
                window_steps += 1
                bar.update(1)
                step = self.state.step
                log_due = step % cfg.logging.every == 0 or step == budget.steps
                eval_due = step == budget.steps or bool(cfg.logging.eval_every and step % cfg.logging.eval_every == 0)
                save_due = step == budget.steps or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                signalled = signals.received is not None
                # values are read back (a host sync) only where they are needed: logging, validation and
                # checkpoints (so a non-finite loss is caught before it is saved), and at once on a signal
                # when alone; several processes agree on a stop at their next such step
                if not (log_due or eval_due or save_due or (signalled and acc.num_processes == 1)):
                    continue
                loss, ce, stop = self.agree(loss_t, ce_t, signalled)
                grad_norm = float(norm_t)
                if not math.isfinite(loss):
                    raise UptrainError(self._non_finite(loss))
                bar.set_postfix(loss=f"{loss:.4f}")
                if log_due:
                    elapsed = time.perf_counter() - window_start
                    tps = window_steps * budget.global_batch_tokens / max(elapsed, 1e-9)
                    last = {
                        "loss": loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens_per_s": tps,
                    }
                    if acc.device.type != "cpu":  # budget.gpu_peak_tflops is an accelerator's peak, not a CPU's
                        last["mfu"] = mfu(tps, budget.params, cfg.budget.gpu_peak_tflops, acc.num_processes)
                    if self.teacher is not None:  # the loss mixes in the KL term: show the CE alone too
                        last["ce"] = ce
                    if acc.device.type == "cuda":
                        last["peak_memory_bytes"] = torch.cuda.max_memory_allocated(acc.device)
                    self.record(last)
                    window_start, window_steps = time.perf_counter(), 0
                if eval_due:
                    metrics = self.validate()
                    last |= metrics
                    self.record(metrics)
                    bar.set_postfix(loss=f"{loss:.4f}", val=f"{metrics['val_loss']:.4f}")
                if save_due or stop:
                    path = self.checkpointer.save(self.state, self.data)
                    if acc.is_main_process:
                        plot_losses(self.run_dir)
                if stop:
                    name = signal.Signals(signals.received or signal.SIGTERM).name
                    raise Stopped(
                        f"stopped by {name} at step {step}: checkpoint saved to {path}; "
                        f"continue with `uptrain train ... --resume`",
                        exit_code=128 + int(signals.received or signal.SIGTERM),
                    )
                if window_steps == 0:  # logging/eval/checkpoint time is not training time
                    window_start = time.perf_counter()
        except BaseException:
            self.end()
            raise
        finally:
            bar.close()
            signals.restore()
        acc.wait_for_everyone()
        weights = self.parallel.full_state_dict()
        progress = {"step": self.state.step, "tokens": self.state.tokens, **last}
        save_final_model(
            acc, self.model, weights, self.tokenizer, cfg, self.run_dir / "model", progress, self.checkpointer.latest()
        )
        self.end()  # after the last collective
        self.metrics.log(f"model saved to {self.run_dir / 'model'}")
        return {"step": self.state.step, "tokens": self.state.tokens, **last}

    def _non_finite(self, loss: float) -> str:
        """What to say when the loss became NaN or inf: the teacher when its logits were the cause (every process
        agrees on that first), and a checkpoint to resume from only when one exists."""
        teacher = self.teacher is not None and self.cfg.distill.weight > 0 and self._teacher_was_bad()
        kept = checkpoints(self.run_dir)
        said = f"the loss became {loss} at step {self.state.step}"
        if teacher:
            said += f" because {self._teacher_cause()}; stopped without saving"
            fix = "give a teacher whose logits are finite"
        else:
            said += "; stopped without saving"
            fix = "lower optim.lr or check the data"
        if kept:
            return f"{said}: {fix}, then resume from {kept[-1]}, the last good checkpoint"
        return f"{said}, and no checkpoint was saved yet: {fix}, then start again"

    def end(self) -> None:
        """Closes the trackers and the process group, after the parallelism freed what must go first."""
        self.model = None  # type: ignore[assignment]  # the parallelism holds what it still needs
        self.parallel.end()
        self.acc.end_training()
