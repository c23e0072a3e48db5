"""The exceptions users see, and the exit status each one means.

Library code raises these; only the command line (`uptrain_gqa.cli`) turns them into a message on
stderr and an exit status.
"""

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What ends a terminal's work (Ctrl-C, kill, a closed terminal or ssh session): all clean up alike."""


class UptrainError(Exception):
    """A bad input or a failed step: the CLI prints `uptrain CMD: error: MESSAGE` and exits with `exit_code`."""

    exit_code: int = 1


class Stopped(UptrainError):
    """The command stopped early on purpose (a signal) after saving what it could.

    The CLI prints `uptrain CMD: MESSAGE` (it is not an error of the input) on the main process only,
    and exits with `exit_code` (128 + the signal number for a signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """A signal that ends a terminal's work (SIGINT, SIGTERM, SIGHUP) raised where the program is, so
    that every atomic writer unwinds and removes its temporary files; the exit status is 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line for an error message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def signal_exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal number (130 for a plain Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", 2)
