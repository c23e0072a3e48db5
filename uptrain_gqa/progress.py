"""What uptrain shows while it works: progress bars and notes, at one verbosity.

Progress bars are tqdm's on a terminal; elsewhere (a log file, a Slurm job, a pipe) plain lines at
intervals: a tqdm bar redraws itself with carriage returns, so written to a file it becomes one very long
line. Where stderr is not a terminal, uptrain's bars print whole lines instead: at the start, at most every
`LINE_SECONDS`, and at the end.

Notes and warnings go through the `uptrain_gqa` logger (library code never prints): the command line
shows them as `uptrain CMD: ...` lines; a Python caller sees warnings, and notes once it configures
logging (`logging.basicConfig(level=logging.INFO)`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import typing
from typing import Any, Literal

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

from uptrain_gqa.errors import UptrainError

Verbosity = Literal["quiet", "normal", "verbose"]
"""quiet: no progress bars and no notes (warnings and errors only); normal: uptrain's own bars and notes;
verbose: also internal details and other libraries' bars (transformers, datasets, huggingface_hub)."""

LOGGER = logging.getLogger("uptrain_gqa")
"""Where library code sends notes (info), details (debug) and warnings, instead of printing."""
PLAIN = {"plain": True}
"""`extra=` of a log record the command line prints as it is, without its `uptrain CMD:` prefix."""
_verbosity: list[Verbosity] = ["normal"]

LINE_SECONDS = 30.0
"""Seconds between two progress lines written to something other than a terminal."""


class LineProgress(plain_tqdm):
    """A tqdm whose display is a whole line now and then (tqdm documents `display` as the method to overload)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._printed_at: float | None = None
        self._final: str | None = None
        fmt = "{desc}{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        desc = f"{kwargs['desc']}: " if kwargs.get("desc") else ""
        super().__init__(*args, **{**kwargs, "desc": desc, "leave": False, "bar_format": fmt})

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if msg == "":  # tqdm clearing the line as it closes: nothing to clear
            return
        now = time.monotonic()
        if self._printed_at is not None and now - self._printed_at < LINE_SECONDS:
            return
        self._printed_at = now
        self._line(msg or self.__str__())

    def _line(self, text: str) -> None:
        self.fp.write(text.strip() + "\n")
        self.fp.flush()

    def close(self) -> None:
        if not self.disable and self._final is None:
            self._final = self.__str__()
            self._line(self._final)
        super().close()


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def set_verbosity(level: Verbosity) -> None:
    """How much uptrain shows while it works (see `Verbosity`); the command line's --quiet / --verbose."""
    if level not in typing.get_args(Verbosity):
        raise UptrainError(f"verbosity must be one of {', '.join(typing.get_args(Verbosity))}; got {level!r}")
    _verbosity[0] = level
    LOGGER.setLevel({"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}[level])
    _other_libraries(show_bars=level == "verbose" and is_terminal())


def _other_libraries(show_bars: bool) -> None:
    """Other libraries' warnings about configs (e.g. token ids) are noise for a converter's user, and their
    progress bars ("Loading weights", "Generating train split") too, unless verbose; never where stderr is a
    file (each redraw a carriage return)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    if show_bars:
        transformers_logging.enable_progress_bar()
        return
    transformers_logging.disable_progress_bar()
    # read when datasets and huggingface_hub are imported; called too where they already are
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()


def verbosity() -> Verbosity:
    return _verbosity[0]


def progress_bar(**kwargs: Any) -> plain_tqdm:
    """A progress bar on stderr (or `file=`) with tqdm's arguments: tqdm's own on a terminal, lines elsewhere;
    none at verbosity quiet."""
    kwargs.setdefault("file", sys.stderr)
    if _verbosity[0] == "quiet":
        kwargs["disable"] = True
    cls = tqdm if is_terminal(kwargs["file"]) else LineProgress
    return cls(**kwargs)
