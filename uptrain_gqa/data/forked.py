"""Multi-process tokenization that a signal stops at once, leaving no temporary files behind.

`datasets` tokenizes with `num_proc` workers through a process pool. Interrupting that pool from the
inside is not safe: the workers inherit the command's signal handlers, `Pool.terminate` can wait
forever on a worker that holds the pool's queue lock, and a worker that dies mid-shard leaves its
`tmp*` file in the cache. So uptrain runs the whole pooled map in one forked child, in a process
group of its own, with the default signal dispositions. The command's process only waits for it.
When a signal reaches the command, it kills the child's whole group (SIGKILL: nothing there can
hang), removes the temporary files that group wrote (their names carry a prefix unique to this
call), and raises the signal on as usual. Shards the child finished stay in the cache and are
reused by the next run; the command then loads the finished blocks from the cache.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import STOP_SIGNALS, Interrupted, UptrainError


def run_in_child(work: Callable[[], Any], temp_dirs: list[Path], what: str) -> None:
    """Run `work()` in a forked child process group and wait for it; its result is not returned (the
    work leaves it in a cache). Raises what `work` raised, `Interrupted` when a stop signal arrives
    while waiting (after killing the group and removing its temporary files in `temp_dirs`), or
    UptrainError when the child was killed from outside."""
    prefix = f"tmp-uptrain-{uuid.uuid4().hex[:12]}-"
    ctx = multiprocessing.get_context("fork")  # the work is a closure over datasets and a tokenizer
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(work, writer, prefix), name=f"uptrain {what}")
    child.start()
    writer.close()
    try:
        child.join()
    except BaseException:
        _stop(child, temp_dirs, prefix)
        raise
    try:
        outcome = reader.recv() if reader.poll() else None
    except (EOFError, OSError):  # the child died while sending
        outcome = None
    finally:
        reader.close()
    if child.exitcode == 0 and outcome is None:
        return
    _remove_temp_files(temp_dirs, prefix)
    if outcome is not None:
        error, child_traceback = outcome
        if not isinstance(error, (UptrainError, OSError)):  # a bug: keep where it happened
            error.add_note(f"in the {what} process:\n{child_traceback}")
        raise error
    code = -(child.exitcode or 0)
    if code in STOP_SIGNALS:  # a signal sent to every process of the job (e.g. Slurm's scancel)
        raise Interrupted(code)
    name = signal.Signals(code).name if code > 0 else f"exit status {child.exitcode}"
    hint = " (out of memory? try fewer data.num_proc)" if code == signal.SIGKILL else ""
    raise UptrainError(f"the {what} process was killed by {name}{hint}; nothing was cached from it")


def _child(work: Callable[[], Any], conn: Any, prefix: str) -> None:
    os.setpgid(0, 0)  # its own group: the command can end it and its workers in one call
    for s in STOP_SIGNALS:  # the command decides when to stop; a signal sent here ends it at once
        signal.signal(s, signal.SIG_DFL)
    tempfile.template = prefix  # datasets names its temporary cache files with the default prefix
    try:
        work()
        conn.send(None)
    except BaseException as e:
        trace = traceback.format_exc()
        try:
            conn.send((e, trace))
        except Exception:  # an exception that does not pickle
            conn.send((RuntimeError(f"{type(e).__name__}: {e}"), trace))
    finally:
        conn.close()


def _stop(child: Any, temp_dirs: list[Path], prefix: str) -> None:
    """Kill the child's group and remove its temporary files; a second signal waits until this is done."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:  # the child had not made its group yet, or is gone
            child.kill()
        child.join()
        _remove_temp_files(temp_dirs, prefix)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _remove_temp_files(temp_dirs: list[Path], prefix: str) -> None:
    for folder in temp_dirs:
        for path in folder.glob(f"{prefix}*"):
            path.unlink(missing_ok=True)
