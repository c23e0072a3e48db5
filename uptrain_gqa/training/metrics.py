"""What a run reports, from the main process only: progress lines, OUT/metrics.jsonl, and trackers.

metrics.jsonl has one JSON object per record: the step, the tokens seen, and the metrics of that
moment (loss, lr, grad norm, tokens/s, MFU every `logging.every` steps; validation loss and
perplexity every `logging.eval_every` steps).
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.io.folders import write_file
from uptrain_gqa.progress import LOGGER, PLAIN

METRICS = "metrics.jsonl"
RUN_RECORD = "uptrain_run.json"
"""Every start and resume of a run: when, at which step, on what (versions, devices, processes), on which data."""


def record_session(run_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append `entry` to the run record (creating it, with a tracker run id that resumes keep); returns it."""
    import uuid

    path = Path(run_dir) / RUN_RECORD
    record = None
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("sessions"), list):
                raise ValueError("not a run record")
        except ValueError as e:  # damaged: kept beside, a new record starts (the run itself is fine)
            record = None
            damaged = path.with_name(f"{RUN_RECORD}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(damaged)
            LOGGER.warning(f"{path} was damaged ({first_line(e)}); kept as {damaged.name}, a new record starts")
    if record is None:
        record = {"tracker_run_id": uuid.uuid4().hex[:16], "sessions": []}
    record["sessions"].append(entry)
    write_file(path, (json.dumps(record, indent=2) + "\n").encode(), "the run record")  # never through a link
    return record


LOSS_PLOT = "loss.png"
"""Training and validation loss against tokens, redrawn from metrics.jsonl at every checkpoint and at the end."""


def available_trackers(names: list[str]) -> tuple[list[str], list[str]]:
    """(the configured accelerate trackers that can run here, those skipped: tensorboard when not installed)."""
    from accelerate.utils import is_tensorboard_available

    missing = [n for n in names if n == "tensorboard" and not is_tensorboard_available()]
    return [n for n in names if n not in missing], missing


def can_plot() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_losses(run_dir: Path) -> Path | None:
    """Draw OUT/loss.png (training loss and validation loss against tokens) from OUT/metrics.jsonl; None when
    matplotlib is missing or nothing was recorded yet. Replaces the previous picture in one rename."""
    path = Path(run_dir) / METRICS
    if not can_plot() or not path.is_file():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line of a killed run
            continue
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for points, label in ((train, "training loss"), (val, "validation loss")):
        if points:  # markers while there are few points (a single one is no line)
            marker = "o" if len(points) < 50 else None
            ax.plot([t for t, _ in points], [v for _, v in points], marker=marker, label=label, markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{Path(run_dir).absolute().name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / LOSS_PLOT
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_file(out, png.getvalue(), LOSS_PLOT)
    return out


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys with scalar values (what trackers accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _step_of(row: str) -> int:
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed run: dropped


class MetricsLog:
    """Progress lines on stderr and metric records, written by the main process; trackers via accelerate."""

    def __init__(self, acc: Any, run_dir: Path) -> None:
        self.acc, self.path = acc, Path(run_dir) / METRICS

    def log(self, text: str) -> None:
        if self.acc.is_main_process:
            LOGGER.info(text, extra=PLAIN)

    def detail(self, text: str) -> None:
        """An internal detail (shown with --verbose)."""
        if self.acc.is_main_process:
            LOGGER.debug(text)

    def start(self, step: int) -> None:
        """Keep only the records of steps up to `step` (where this run starts or resumes): records a
        killed run wrote after its last checkpoint, or an earlier run's, would otherwise repeat."""
        if not self.acc.is_main_process or not self.path.is_file():
            return
        rows = self.path.read_text().splitlines(keepends=True)
        kept = [r for r in rows if step > 0 and _step_of(r) <= step]
        if kept != rows:
            write_file(self.path, "".join(kept).encode(), "the metrics log")

    def record(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        self.acc.log(metrics, step=step)
        if self.acc.is_main_process:
            row = {"step": step, "tokens": tokens, **metrics}
            try:  # appended, never through a link put in its place
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise UptrainError(
                    f"{self.path} is a symlink; uptrain writes its metrics only into its own file: remove the link "
                    "and resume the run"
                ) from e
            with os.fdopen(fd, "a") as f:
                f.write(json.dumps(row) + "\n")
