"""Configs as dataclasses: YAML in, dotted overrides, checked keys and types, YAML out.

A config is a tree of dataclasses. Each field is documented by the string literal written
right after it (read from the source by `field_docs`, so `--help` shows the same text as the
code). Loading checks every key against the fields — an unknown key fails with the closest
valid name — coerces YAML scalars to the field's type (`3e-4` is a float, `2e12` an int) and
runs each dataclass's `__post_init__` validation.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import os
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from uptrain_gqa.errors import UptrainError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Marks a command parameter (`Annotated[list[str] | None, Overrides(Config)]`) that collects
    `--section.key=value` arguments for the config dataclass `Config`; the CLI lists its keys in
    the command's help. With `section`, only keys of that section are accepted (e.g. `data`); with `keys`,
    only those of its keys are listed, with `helps` replacing their docstrings."""

    config: type
    section: str | None = None
    keys: tuple[str, ...] | None = None
    helps: dict[str, str] | None = None

    def help_lines(self) -> list[str]:
        if self.section is None:
            return key_help(self.config)
        return key_help(self.config, f"{self.section}.", self.keys, self.helps)


def argument() -> Any:
    """A required field of a stage's options dataclass that the command line takes as a positional argument
    (e.g. ConvertOptions.src); the other fields become --options."""
    return dataclasses.field(metadata={"argument": True})


def argument_default(default: Any) -> Any:
    """An optional field taken as a positional argument (e.g. PlanOptions.model)."""
    return dataclasses.field(default=default, metadata={"argument": True})


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literals that follow each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def positive(section: str, **values: float | int | None) -> None:
    """Refuse zero or negative values of a section's fields (None means unset and passes)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise UptrainError(f"{section}.{name} must be positive, got {value}")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _unknown(key: str, where: str, valid: list[str]) -> UptrainError:
    full = f"{where}.{key}" if where else key
    prefix = f"{where}." if where else ""
    return UptrainError(f"unknown config key '{full}'{_suggest(full, [prefix + v for v in valid])}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, where)
            except UptrainError as e:
                errors.append(str(e))
        raise UptrainError(errors[0])
    if origin is typing.Literal:
        if value in args:
            return value
        raise UptrainError(f"{where} must be one of {', '.join(map(str, args))}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, dict):
            raise UptrainError(f"{where} must be a mapping of keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UptrainError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UptrainError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        number = _number(value, where)
        if number != int(number):
            raise UptrainError(f"{where} must be a whole number, got {value!r}")
        return int(number)
    if tp is float:
        return float(_number(value, where))
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UptrainError(f"{where} must be text, got {value!r}")
        return str(value)
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise UptrainError(f"{where} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(str(value).replace("_", ""))
    except ValueError:
        raise UptrainError(f"{where} must be a number, got {value!r}") from None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursively; unknown keys and bad types are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(key, where, names)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    required = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs
    ]
    if required:
        keys = ", ".join(f"{where}.{n}" if where else n for n in required)
        raise UptrainError(f"the config needs {keys} (`--help` lists every key)")
    return cls(**kwargs)


def options_of(cls: type[T], options: Any, fields: dict[str, Any], caller: str) -> T:
    """The options object a stage's Python function runs on: `options` (an instance of `cls`, a mapping of its
    fields, or None) with `fields` on top; anything else refused in one line naming `caller`."""
    if options is None or isinstance(options, Mapping):
        return cls(**{**(options or {}), **fields})
    if isinstance(options, cls):
        return dataclasses.replace(options, **fields) if fields else options  # type: ignore[type-var]
    raise UptrainError(f"{caller} takes {cls.__name__} or a mapping of its fields, got {type(options).__name__}")


def accept_paths_and_single_items(obj: Any, paths: tuple[str, ...] = (), lists: tuple[str, ...] = ()) -> None:
    """What a Python caller may hand an options object beside its declared types: a Path for a text field of
    `paths` (kept as its text), one string for a list field of `lists` (kept as a one-item list)."""
    for name in paths:
        value = getattr(obj, name)
        if isinstance(value, os.PathLike):
            setattr(obj, name, os.fspath(value))
    for name in lists:
        if isinstance(getattr(obj, name), str):
            setattr(obj, name, [getattr(obj, name)])


def check_types(obj: Any) -> None:
    """Refuse, in one line, a field of dataclass `obj` whose value is not of its annotated type (the options a
    Python caller builds by hand are checked as strictly as the YAML a user writes; an int passes for a float)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _is_a(value, hints[f.name]):
            raise UptrainError(f"{type(obj).__name__}.{f.name} must be {_type_name(hints[f.name])}, got {value!r}")


def _is_a(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_is_a(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "None"
    return {int: "an int", float: "a number", str: "text", bool: "True or False"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UptrainError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--optim.lr=1e-4', '--data.files', 'a.txt', '--model.compile', '--out=run'] -> {dotted key: value}.
    Values are read as YAML (so lists, numbers and booleans work); a key alone means true."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UptrainError(f"unexpected argument {arg!r}; config overrides look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw, i = args[i + 1], i + 1
            else:
                raw = "true"
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # '[1,' or a YAML tag: one line, naming the override
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UptrainError(
                f"override --{key}={raw} is not a YAML value ({problem}); quote strings, close lists like [1, 2]"
            ) from e
        i += 1
    return out


def load(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """Read YAML `path` (or start empty), apply dotted overrides, validate into `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UptrainError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UptrainError(f"{path} is not valid YAML{where}: {problem}") from e
        if not isinstance(data, dict):
            raise UptrainError(f"{path} must hold a mapping of config sections")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return from_dict(cls, data)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def dumps(obj: Any) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def dump(obj: Any, path: Path) -> None:
    """The resolved config as a YAML file."""
    Path(path).write_text(dumps(obj))


def key_help(
    cls: type, prefix: str = "", keys: tuple[str, ...] | None = None, helps: dict[str, str] | None = None
) -> list[str]:
    """Help lines: every dotted key (or only `keys`) with its default and docstring (or its text in `helps`)."""
    lines: list[str] = []
    docs = field_docs(cls) | (helps or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if keys is not None and f.name not in keys:
            continue
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}:  {docs.get(f.name, '')}")
            lines += key_help(tp, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        choices = _choices(tp)
        allowed = f" [{' | '.join(map(str, choices))}]" if choices else ""
        lines.append(f"  --{name}={default!r}{allowed}  {docs.get(f.name, '')}")
    return lines


def _choices(tp: Any) -> tuple[Any, ...]:
    """The values a Literal field (or an optional one) allows; empty for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(tp) for c in _choices(a))
    return ()
