"""The `uptrain` command: each subcommand is a plain function whose docstring is its help.

The parser is built from the function's signature (positional parameters become arguments,
keyword-only ones options; bool -> flag, Literal -> choices) and the `Args:` section of its
docstring, so the help cannot drift from the code.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from uptrain import __version__
from uptrain.errors import UptrainError

COMMANDS: dict[str, str] = {
    "convert": "uptrain.convert:convert",
    "inspect": "uptrain.describe:inspect",
    "train": "uptrain.train:train",
    "eval": "uptrain.evaluate:evaluate",
    "plan": "uptrain.plan:plan",
}
OVERRIDES = "overrides"  # a parameter of this name collects --section.key=value arguments


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


def _unwrap(tp: Any) -> tuple[Any, dict[str, Any]]:
    """(type without Optional/Annotated, extra argparse settings from Annotated metadata)."""
    extra: dict[str, Any] = {}
    if typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
        for m in meta:
            extra |= m
    return _unwrap_optional(tp), extra


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_command(subparsers: Any, name: str, fn: Callable[..., Any]) -> None:
    summary, body, helps = _parse_docstring(inspect.getdoc(fn) or name)
    epilog = getattr(fn, "cli_epilog", None)
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n{body}" if body else summary,
        epilog=epilog() if epilog else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(fn, include_extras=True)
    for param in inspect.signature(fn).parameters.values():
        if param.name == OVERRIDES:
            parser.set_defaults(_overrides=True)
            parser.usage = f"{parser.format_usage().strip().removeprefix('usage: ')} [--section.key=value ...]"
            continue
        tp, extra = _unwrap(hints.get(param.name, str))
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
        if tp is bool:
            parser.add_argument(flag, action="store_true", help=text)
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(flag, required=True, metavar=param.name.upper(), **kwargs)
        else:
            if param.default is not None:
                kwargs["help"] = f"{text} (default: {param.default})"
            parser.add_argument(flag, default=param.default, **kwargs)
    parser.set_defaults(_command=name, _fn=fn)


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
    raise KeyboardInterrupt  # unwinds through the atomic writers, which remove their temp folders


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    args = vars(namespace)
    fn = args.pop("_fn", None)
    command = args.pop("_command", None)
    if fn is None:
        parser.print_help(sys.stderr)
        return 2
    if args.pop("_overrides", False):
        args[OVERRIDES] = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        fn(**args)
    except UptrainError as e:
        print(f"uptrain {command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ... while working: one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"uptrain {command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"uptrain {command}: {getattr(fn, 'cli_interrupted', 'interrupted')}", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    """Library warnings about configs (e.g. token ids) are noise for a converter's user."""
    from transformers.utils import logging

    logging.set_verbosity_error()
