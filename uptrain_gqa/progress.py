"""Progress bars: tqdm's on a terminal; elsewhere (a log file, a Slurm job, a pipe) plain lines at intervals.

A tqdm bar redraws itself with carriage returns, so written to a file it becomes one very long line. Where
stderr is not a terminal, uptrain's bars print whole lines instead: at the start, at most every
`LINE_SECONDS`, and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

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


def progress_bar(**kwargs: Any) -> plain_tqdm:
    """A progress bar on stderr (or `file=`) with tqdm's arguments: tqdm's own on a terminal, lines elsewhere."""
    kwargs.setdefault("file", sys.stderr)
    cls = tqdm if is_terminal(kwargs["file"]) else LineProgress
    return cls(**kwargs)
