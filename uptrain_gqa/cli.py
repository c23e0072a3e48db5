"""The `uptrain` command: each subcommand is a plain function whose docstring is its help.

The parser is built from the function's signature (positional parameters become arguments,
keyword-only ones options; bool -> flag, Literal -> choices; a parameter annotated with
`config.Overrides` collects --section.key=value settings, and the config's keys are listed in the
help) and the `Args:` section of its docstring, so the help cannot drift from the code. This is the
only place that exits: library code raises, and each exception type carries its exit status.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import pickle
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from uptrain_gqa.config import Overrides
from uptrain_gqa.errors import STOP_SIGNALS, Interrupted, Stopped, UptrainError, signal_exit_code
from uptrain_gqa.version import __version__

COMMANDS: dict[str, str] = {
    "convert": "uptrain_gqa.commands.convert:convert",
    "inspect": "uptrain_gqa.commands.inspect:inspect",
    "train": "uptrain_gqa.commands.train:train",
    "eval": "uptrain_gqa.commands.eval:evaluate",
    "plan": "uptrain_gqa.commands.plan:plan",
    "export": "uptrain_gqa.commands.export:export",
    "env": "uptrain_gqa.commands.env:env",
}


def _load(target: str) -> Callable[..., Any]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _parse_docstring(doc: str) -> tuple[str, str, dict[str, str]]:
    """(summary, body, {arg: help}) from a Google-style docstring."""
    head, _, args_block = doc.partition("\nArgs:\n")
    summary, _, body = head.strip().partition("\n")
    helps: dict[str, str] = {}
    current = None
    for line in args_block.splitlines():
        m = re.match(r"^\s{4}(\w+):\s*(.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return summary.strip(), body.strip(), helps


def _unwrap(tp: Any) -> tuple[Any, dict[str, Any], Overrides | None]:
    """(type without Optional/Annotated, extra argparse settings and the Overrides marker from Annotated metadata)."""
    extra: dict[str, Any] = {}
    overrides = None
    if typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
        for m in meta:
            if isinstance(m, Overrides):
                overrides = m
            else:
                extra |= m
    return _unwrap_optional(tp), extra, overrides


def _overrides_parameter(fn: Callable[..., Any]) -> tuple[str, Overrides] | None:
    """The parameter of `fn` that collects --section.key=value settings, if any."""
    for name, tp in typing.get_type_hints(fn, include_extras=True).items():
        marker = _unwrap(tp)[2]
        if marker is not None:
            return name, marker
    return None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_command(subparsers: Any, name: str, fn: Callable[..., Any]) -> None:
    summary, body, helps = _parse_docstring(inspect.getdoc(fn) or name)
    collector = _overrides_parameter(fn)
    epilog = None
    if collector is not None:
        epilog = "config keys (YAML sections, or --section.key=value overrides):\n" + "\n".join(
            collector[1].help_lines()
        )
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n{body}" if body else summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(fn, include_extras=True)
    flags = ["--help"]  # for "did you mean" on an unknown one
    for param in inspect.signature(fn).parameters.values():
        if collector is not None and param.name == collector[0]:
            parser.set_defaults(_overrides=param.name)
            parser.usage = f"{parser.format_usage().strip().removeprefix('usage: ')} [--section.key=value ...]"
            continue
        tp, extra, _ = _unwrap(hints.get(param.name, str))
        text = helps.get(param.name, "")
        kwargs: dict[str, Any] = {"help": text, **extra}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp in (int, float):
            kwargs["type"] = tp
        elif typing.get_origin(tp) is list:
            kwargs["nargs"] = "+"
        if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:  # before `*`: an argument
            if param.default is not inspect.Parameter.empty:
                kwargs |= {"nargs": "?", "default": param.default}
            parser.add_argument(param.name, metavar=param.name.upper(), **kwargs)
            continue
        flag = "--" + param.name.replace("_", "-")
        flags.append(flag)
        if tp is bool:
            parser.add_argument(flag, action="store_true", help=text)
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(flag, required=True, metavar=param.name.upper(), **kwargs)
        else:
            if param.default is not None:
                kwargs["help"] = f"{text} (default: {param.default})"
            parser.add_argument(flag, default=param.default, **kwargs)
    parser.set_defaults(_command=name, _fn=fn, _parser=parser, _flags=flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uptrain",
        description=(
            "Turn multi-head-attention (MHA) checkpoints into grouped-query-attention (GQA) ones:\n"
            "pool key/value heads, then recover quality by uptraining. `uptrain CMD --help` for details."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"uptrain {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="CMD")
    for name, target in COMMANDS.items():
        _add_command(sub, name, _load(target))
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)  # unwinds through the atomic writers, which remove their temp folders


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # answered before the commands import torch
        print(f"uptrain {__version__}")
        return 0
    from uptrain_gqa.device import check_launch_environment, is_main_process
    from uptrain_gqa.io.tensors import refused_pickle

    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    args = vars(namespace)
    fn = args.pop("_fn", None)
    command = args.pop("_command", None)
    subparser, flags = args.pop("_parser", parser), args.pop("_flags", [])
    if fn is None:
        parser.print_help(sys.stderr)
        return 2
    collector = args.pop("_overrides", None)
    if collector is not None:
        args[collector] = unknown
    elif unknown:
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; see uptrain {command} --help"
        subparser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    _quiet_libraries()
    for s in STOP_SIGNALS:
        signal.signal(s, _interrupt)
    try:
        check_launch_environment()
        fn(**args)
    except Stopped as e:  # on purpose, after saving what could be saved: not an error of the input
        if is_main_process():
            print(f"uptrain {command}: {e}", file=sys.stderr)
        return e.exit_code
    except UptrainError as e:
        print(f"uptrain {command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except pickle.UnpicklingError as e:  # transformers loading a .bin checkpoint (eval, train, teacher)
        print(f"uptrain {command}: error: a pytorch_model*.bin checkpoint: {refused_pickle(e)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `uptrain inspect ... | head`: the reader has what it wanted
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except OSError as e:  # disk full, permissions, ... while working: one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"uptrain {command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        code = signal_exit_code(e)
        print(f"uptrain {command}: interrupted by {signal.Signals(code - 128).name}", file=sys.stderr)
        return code
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _quiet_libraries() -> None:
    """Library warnings about configs (e.g. token ids) are noise for a converter's user; so are the libraries'
    progress bars when stderr is a file (each redraw a carriage return): uptrain's own then print lines."""
    from transformers.utils import logging

    from uptrain_gqa.progress import is_terminal

    logging.set_verbosity_error()
    if is_terminal():
        return
    logging.disable_progress_bar()
    # read when datasets and huggingface_hub are imported; called too where they already are
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
