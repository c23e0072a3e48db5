"""Outputs uptrain owns: one writer per OUT at a time, and only uptrain's own folders replaced.

Every command that writes OUT holds `OutputLock(OUT)` while it works: an exclusive `flock` on a
hidden file beside OUT (`.NAME.uptrain.lock`), so a second convert or train on the same OUT refuses
at once instead of racing the first. The kernel releases the lock when its process dies, so a lock
left by a killed run is stale by construction: the next run takes it over and says so.

`--overwrite` replaces only what uptrain made: a folder holding one of uptrain's record files (a
converted checkpoint, a training run; see `uptrain_gqa.io.folders.MARKERS`), or an empty one. Never the
input of the command, never a user's folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.progress import LOGGER

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
"""Never through a link, never truncated on opening, never blocking on a FIFO put in its place."""
_RECORD_BYTES = 64
_PID = re.compile(rb"\s*(\d{1,10})\s*")


def _pid_in(record: bytes) -> str | None:
    """The process id a lock file of ours holds; None for anything else (never shown: it may be anyone's file)."""
    match = _PID.fullmatch(record)
    return match.group(1).decode() if match else None


def note(text: str) -> None:
    """A one-line notice (through the uptrain_gqa logger), from the process that holds the lock."""
    LOGGER.warning(text)


def lock_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.uptrain.lock"


def stale_temporaries(out: Path) -> list[Path]:
    """Hidden temporary folders that an interrupted or killed write to `out` left beside it."""
    out = Path(out).absolute()
    return sorted(p for p in out.parent.glob(f".{out.name}.uptrain-*") if p.is_dir()) if out.parent.is_dir() else []


class OutputLock:
    """Exclusive ownership of OUT for one process; `with OutputLock(out):` or acquire()/release()."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out).absolute()
        self.path = lock_path(self.out)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise UptrainError naming the process that holds it.

        The lock file is opened without following a link and never truncated or written before it is
        ours: a symlink, a hard link, a special file or a file uptrain did not write at its path is
        refused (and never shown), so a planted link cannot make uptrain overwrite another file."""
        while True:
            self._check_kind()
            try:
                fd = os.open(self.path, _OPEN_FLAGS, 0o644)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EMLINK):  # a link planted between the check and the open
                    raise self._refusal("a symlink") from e
                raise UptrainError(
                    f"cannot write into {self.path.parent} ({e.strerror}); choose another output folder"
                ) from e
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise self._refusal("not a regular file")
                if info.st_nlink > 1:  # another name for the same file: writing the PID would change it
                    raise self._refusal("a file with other names (a hard link)")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _pid_in(os.pread(fd, _RECORD_BYTES, 0))
                    raise UptrainError(
                        f"{self.out} is being written by "
                        f"{f'uptrain process {holder}' if holder else 'another process'}; wait for it to finish "
                        "or choose another output folder"
                    ) from None
                # the file may have been removed by its last owner between our open and flock: lock the live one
                try:
                    same = os.path.samestat(info, os.lstat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    previous = os.pread(fd, _RECORD_BYTES, 0)
                    holder = _pid_in(previous)
                    if previous.strip() and holder is None:
                        raise UptrainError(
                            f"{self.path} is not an uptrain lock (it holds something else); move it away or "
                            "choose another output folder"
                        )
                    if holder:
                        note(
                            f"a previous run on {self.out} (process {holder}) ended without releasing its lock; "
                            "taking it over"
                        )
                    pid = str(os.getpid()).encode()
                    os.pwrite(fd, pid, 0)
                    os.ftruncate(fd, len(pid))
                    self._fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _check_kind(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as e:
            raise UptrainError(
                f"cannot write into {self.path.parent} ({e.strerror}); choose another output folder"
            ) from e
        if stat.S_ISLNK(mode):
            raise self._refusal("a symlink")
        if not stat.S_ISREG(mode):
            raise self._refusal("not a regular file")

    def _refusal(self, kind: str) -> UptrainError:
        return UptrainError(
            f"the lock file {self.path} of {self.out} is {kind}, which uptrain never writes through; remove it "
            "(it is not uptrain's) or choose another output folder"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # while still holding it: a waiting process re-checks the inode
            if os.path.samestat(os.fstat(self._fd), os.lstat(self.path)):  # ours, not what replaced it
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_input(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise if `out` is one of the command's inputs, holds one, or lies inside one."""
    out = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given).resolve()
        if path.exists() and (_inside(path, out) or _inside(out, path)):
            raise UptrainError(f"{out} holds an input of this command ({given}); choose another output folder")


def check_replaceable(out: Path, markers: tuple[str, ...], inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise unless `--overwrite` may replace `out`: a folder holding one of `markers` (or empty) that
    holds none of the command's inputs and is not inside one."""
    out = Path(out).resolve()
    check_not_input(out, inputs)
    if not out.exists():
        return
    if not out.is_dir():
        raise UptrainError(f"{out} exists and is not a folder; choose another output path")
    if any(out.iterdir()) and not any((out / marker).is_file() for marker in markers):
        raise UptrainError(
            f"{out} was not written by uptrain (it holds no {' or '.join(markers)}); --overwrite only replaces "
            "uptrain's own outputs: choose another output folder, or empty it yourself"
        )


def clean_stale_temporaries(out: Path, remove: bool) -> None:
    """Name (and with `remove`, delete) temporary folders a killed write to `out` left behind. Call it
    while holding OutputLock(out): no live writer can own them then."""
    for tmp in stale_temporaries(out):
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
            note(f"removed {tmp}, left by an interrupted run")
        else:
            note(f"{tmp} was left by an interrupted run; delete it, or pass --overwrite to remove it")
