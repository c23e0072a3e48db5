"""The `uptrain` command: each subcommand is a plain function whose docstring is its help.

The parser is built from the function's signature (positional parameters become arguments,
keyword-only ones options; bool -> flag, Literal -> choices; a parameter annotated with
`config.Overrides` collects --section.key=value settings, and the config's keys are listed in the
help; a parameter whose type is a stage's options dataclass, such as ConvertOptions, contributes one
option per field, documented by the field's docstring, and is built from them) and the `Args:`
section of its docstring, so the help cannot drift from the code. Every command also takes --quiet
and --verbose. This is the only place that exits: library code raises, and each exception type
carries its exit status; it never prints either, and its notes reach the user through the logger
this module sets up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import pickle
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from uptrain_gqa.config import Overrides, field_docs
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


def _options_class(tp: Any) -> type | None:
    """The options dataclass a command parameter takes (its fields become the command's options), if any."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _add_argument(
    parser: argparse.ArgumentParser, name: str, tp: Any, default: Any, text: str, positional: bool, flags: list[str]
) -> None:
    """One argument (positional) or option: bool -> flag, Literal -> choices, int/float typed, list -> nargs."""
    tp, extra, _ = _unwrap(tp)
    kwargs: dict[str, Any] = {"help": text, **extra}
    if typing.get_origin(tp) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(tp))
    elif tp in (int, float):
        kwargs["type"] = tp
    elif typing.get_origin(tp) is list:
        kwargs["nargs"] = "+"
    if positional:
        if default is not inspect.Parameter.empty:
            kwargs |= {"nargs": "?", "default": default}
        parser.add_argument(name, metavar=name.upper(), **kwargs)
        return
    flag = "--" + name.replace("_", "-")
    flags.append(flag)
    if tp is bool:
        parser.add_argument(flag, action="store_true", help=text)
    elif default is inspect.Parameter.empty:
        parser.add_argument(flag, required=True, metavar=name.upper(), **kwargs)
    else:
        if default is not None:
            kwargs["help"] = f"{text} (default: {default})"
        parser.add_argument(flag, default=default, **kwargs)


def _add_options(parser: argparse.ArgumentParser, cls: type, flags: list[str]) -> list[str]:
    """One argument or option per field of the options dataclass `cls` (fields marked `config.argument()` are
    positional); returns the field names."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls, include_extras=True)
    names = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):  # set by the command from other arguments
            continue
        default: Any = inspect.Parameter.empty
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        _add_argument(parser, f.name, hints[f.name], default, docs.get(f.name, ""), f.metadata.get("argument", False),
                      flags)  # fmt: skip
        names.append(f.name)
    return names


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
    flags = ["--help", "--quiet", "--verbose"]  # for "did you mean" on an unknown one
    options: dict[str, tuple[type, list[str]]] = {}
    for param in inspect.signature(fn).parameters.values():
        if collector is not None and param.name == collector[0]:
            parser.set_defaults(_overrides=param.name)
            parser.usage = f"{parser.format_usage().strip().removeprefix('usage: ')} [--section.key=value ...]"
            continue
        cls = _options_class(hints.get(param.name))
        if cls is not None:
            options[param.name] = (cls, _add_options(parser, cls, flags))
            continue
        positional = param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD  # before `*`: an argument
        _add_argument(parser, param.name, hints.get(param.name, str), param.default, helps.get(param.name, ""),
                      positional, flags)  # fmt: skip
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="No progress bars or notes; warnings and errors only.")
    more = "Also internal details and other libraries' progress bars (transformers, datasets)."
    shown.add_argument("--verbose", action="store_true", help=more)
    parser.set_defaults(_command=name, _fn=fn, _parser=parser, _flags=flags, _options=options)


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
    options = args.pop("_options", {})
    quiet, verbose = args.pop("quiet", False), args.pop("verbose", False)
    level = "quiet" if quiet else "verbose" if verbose else "normal"
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
    _show(command, level)
    for s in STOP_SIGNALS:
        signal.signal(s, _interrupt)
    try:
        check_launch_environment()
        for param, (cls, names) in options.items():  # validated by the dataclass, as for a Python caller
            args[param] = cls(**{n: args.pop(n) for n in names})
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


class _Lines(logging.Handler):
    """uptrain's notes and warnings on stderr as `uptrain CMD: ...` lines (stderr looked up when written, so a
    replaced stream is followed)."""

    def __init__(self) -> None:
        super().__init__()
        self.command = ""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if not getattr(record, "plain", False):
            kind = "warning: " if record.levelno >= logging.WARNING else ""
            text = f"uptrain {self.command}: {kind}{text}"
        with contextlib.suppress(OSError, ValueError):  # stderr closed: nothing left to tell
            print(text, file=sys.stderr, flush=True)


_LINES = _Lines()


def _show(command: str, level: str) -> None:
    """What the command shows while it works (`progress.set_verbosity`), uptrain's notes as `uptrain CMD:`
    lines on stderr."""
    from uptrain_gqa.progress import LOGGER, set_verbosity

    set_verbosity(level)  # type: ignore[arg-type]
    _LINES.command = command
    if _LINES not in LOGGER.handlers:
        LOGGER.addHandler(_LINES)
    LOGGER.propagate = False
