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
import fcntl
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.progress import LOGGER


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
        """Take the lock or raise UptrainError naming the process that holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UptrainError(
                    f"cannot write into {self.path.parent} ({e.strerror}); choose another output folder"
                ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UptrainError(
                    f"{self.out} is being written by uptrain process {holder}; wait for it to finish or "
                    "choose another output folder"
                ) from None
            # the file may have been removed by its last owner between our open and flock: lock the live one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous:
            note(f"a previous run on {self.out} (process {previous}) ended without releasing its lock; taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: a waiting process re-checks the inode
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
