"""Folders uptrain reads and writes: config and record files, side files, and atomic output folders."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.io.ownership import OutputLock, check_replaceable, clean_stale_temporaries
from uptrain_gqa.io.tensors import PICKLE_INDEX, SAFE_INDEX, WEIGHT_SUFFIXES
from uptrain_gqa.units import format_bytes

RECORD_PREFIX = "uptrain_"
"""The start of the name of every record uptrain writes into a folder (conversion record, run config, run record)."""
CONVERSION_RECORD = "uptrain_conversion.json"
"""What `uptrain convert` did, written into every converted folder (and carried into trained models)."""
TRAIN_CONFIG = "uptrain_train.yaml"
"""A training run's resolved config: in the run folder, in every checkpoint, and in the final model."""
MARKERS = (CONVERSION_RECORD, TRAIN_CONFIG)
"""Files that say uptrain wrote a folder, so that `--overwrite` may replace it."""


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object from `path`; `missing` is the message when the file is absent."""
    if not Path(path).is_file():
        raise UptrainError(missing)
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UptrainError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise UptrainError(f"{path} does not hold a JSON object")
    return data


def side_files(folder: Path) -> list[Path]:
    """Non-weight files to carry over (tokenizer, generation config, model card, ...).

    A side file that is a link to a file outside `folder` is refused: copying it would carry a file of the
    user's from elsewhere into OUT (and onto the Hub). A Hugging Face cache snapshot is the exception within
    its own repo: its files are links into the repo's `blobs/` folder."""
    skip = {SAFE_INDEX, PICKLE_INDEX, "config.json"}
    files = sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES)
    )
    root = _own_root(Path(folder))
    for path, target in links_leaving(files, root):
        raise UptrainError(
            f"{path} is a link to {target}, outside the source folder; uptrain does not carry files from elsewhere "
            f"into OUT: copy it into {folder} as a regular file (or remove the link)"
        )
    return files


def _own_root(folder: Path) -> Path:
    """The folder whose files `folder`'s links may reach: itself, or for a Hugging Face cache snapshot
    (`models--org--name/snapshots/COMMIT`), its repo's folder (`blobs/` holds the files it links to)."""
    folder = folder.resolve()
    snapshots, repo = folder.parent, folder.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        return repo
    return folder


def links_leaving(paths: list[Path], root: Path) -> Iterator[tuple[Path, Path]]:
    """(path, where it leads) for each of `paths` that is a link leading outside `root`."""
    root = Path(root).resolve()
    for path in paths:
        if path.is_symlink():
            target = path.resolve()
            if target != root and root not in target.parents:
                yield path, target


def links_leaving_folder(folder: Path) -> Iterator[tuple[Path, Path]]:
    """(path, where it leads) for each link anywhere under `folder` (files and folders, links not followed)
    that leads outside it."""
    for parent, dirs, names in os.walk(folder):
        yield from links_leaving([Path(parent) / n for n in sorted(dirs + names)], Path(folder))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    """The folder holds a tokenizer (one of the files transformers reads one from)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UptrainError(f"cannot write into {folder} (permission denied); choose another output folder")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, inputs: tuple[str | Path | None, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    Holds `out`'s lock throughout, so a concurrent writer refuses instead of racing. A failed or
    interrupted run leaves no `out`; a killed one may leave a hidden `.NAME.uptrain-*` folder beside
    it, which the next write to `out` names (and removes with `overwrite`). `overwrite` replaces only
    a folder uptrain wrote, never one that holds `inputs`. Missing parent folders are created and
    removed again on failure.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise UptrainError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UptrainError(f"{out} exists and is not a folder; choose another output path")
    if overwrite:
        check_replaceable(out, MARKERS, inputs)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    base = created[-1].parent if created else out.parent  # the deepest folder that exists
    if not base.is_dir():
        raise UptrainError(f"cannot create {out}: {base} is not a folder")
    _check_writable(base)
    if created:
        out.parent.mkdir(parents=True)
    lock = OutputLock(out)
    try:
        lock.acquire()
        if out.exists() and not overwrite:  # written by another process since the check above
            raise UptrainError(f"{out} already exists; pass --overwrite to replace it")
        clean_stale_temporaries(out, remove=overwrite)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.uptrain-", dir=out.parent))
        except OSError as e:
            raise UptrainError(f"cannot write into {out.parent} ({e.strerror}); choose another output folder") from e
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        lock.release()
        raise
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700 folders; OUT gets the usual permissions
        yield tmp
        respect_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.uptrain-old-", dir=out.parent))
            os.replace(out, old / "old")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    finally:
        lock.release()


def current_umask() -> int:
    """The process's umask (reading it means setting it: put it back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def respect_umask(folder: Path) -> None:
    """Files as the user's umask says (0644 with the usual 022): libraries that write through private
    temporary files (transformers' and accelerate's weights) leave them 0600, which others on a shared
    cluster cannot read."""
    umask = current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~umask)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, as a dict."""
    missing = f"no config.json in {folder}; SRC must be a Hugging Face checkpoint folder"
    return read_json_object(Path(folder) / "config.json", missing)


LOW_SPACE = 64 * 2**20
"""Bytes free below which a failed write is put down to a full disk (torch's zip writer loses the OS error)."""
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}


def write_failure(error: BaseException, where: Path) -> str | None:
    """Why writing under `where` failed, in words, with the space left there — or None when `error` does
    not look like a failed write (no OS error in it, its causes or any DCP process's failure, and space
    left): then it is a bug to report as it is."""
    errors, seen = [error], []
    code: int | None = None
    while errors and code is None:
        e = errors.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.errno is not None:
            code = e.errno
        elif match := re.search(r"\(os error (\d+)\)", str(e)):  # safetensors' own error type
            code = int(match.group(1))
        errors += [c for c in (e.__cause__, e.__context__) if c is not None]
        errors += [f[0] for f in getattr(e, "failures", {}).values() if isinstance(f, tuple)]  # DCP: per process
    folder = next(p for p in [Path(where).absolute(), *Path(where).absolute().parents] if p.exists())
    free = shutil.disk_usage(folder).free
    space = f"{format_bytes(free)} free there"
    if code is not None:
        return f"{_FULL.get(code) or os.strerror(code)} ({space})"
    if free < LOW_SPACE:
        while getattr(error, "failures", None):  # DCP: the first process's own failure
            error = next(iter(error.failures.values()))[0]
        return f"the disk is probably full ({space}; {type(error).__name__}: {first_line(error)})"
    return None


def write_file(target: Path, data: bytes, what: str) -> None:
    """Write `data` as the file `target`, whole or not at all: into a new temporary file beside it (opened
    exclusively, never through a link), renamed over `target` at the end. A FIFO or a character device, or a
    link to one (/dev/stdout), is written into as it is, never replaced; another symlink, a folder or another
    special file is refused (`what` names the option in the message), so nothing of the user's is replaced."""
    import stat
    import uuid

    target = Path(target)
    if is_stream(target):
        with open(target, "wb") as stream:  # a pipe or a terminal: streamed, as `> target` would
            stream.write(data)
        return
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UptrainError(f"{what} {target} is {kind}; uptrain replaces only regular files: choose another path")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.uptrain-tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_stream(path: Path) -> bool:
    """`path` is a FIFO or a character device (a terminal, /dev/null), or a link to one: written into, never
    replaced by a file."""
    import stat

    try:
        mode = Path(path).stat().st_mode  # through links: /dev/stdout -> /proc/self/fd/1 -> a pipe
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)
