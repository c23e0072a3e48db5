"""Text named on the command line: `[LABEL[:WEIGHT]=]DATA`, where DATA is local files (globs), a Hub dataset
id, or a built-in set (`uptrain:broad`, `uptrain:heldout`, ...; see uptrain_gqa.data.builtin).

`convert --calibration`, `plan --calibration/--quality` and `eval --data` take one or several of these.
LABEL names the text in reports (default: derived from DATA; a built-in set gives one label per part) and
WEIGHT is its relative share where texts are mixed (calibration; default 1). A built-in set's parts keep
their own shares, scaled by the set's weight.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from uptrain_gqa.data import builtin
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.data.documents import FORMATS, expand_files
from uptrain_gqa.errors import UptrainError

HUB_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")
FILE_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".parquet")
_NAMED = re.compile(r"^(?P<label>[\w.-]+)(?::(?P<weight>[^=/]+))?=(?P<data>.+)$")


def data_kind(spec: str) -> Literal["files", "hub", "builtin"]:
    """What DATA names: a built-in set, local files (anything path-like or existing), or a Hub dataset id."""
    if builtin.is_builtin(spec):
        return "builtin"
    looks_local = (
        any(c in spec for c in "*?[") or spec.lower().endswith(FILE_SUFFIXES) or Path(spec).expanduser().exists()
    )
    return "files" if looks_local or not HUB_ID.match(spec) else "hub"


@dataclass(frozen=True)
class TextSource:
    """One labelled text: what was given, and how to read it."""

    label: str
    weight: float
    """Relative share where texts are mixed."""
    spec: str
    """DATA as given (a built-in part: its full name, uptrain:SET.PART)."""
    kind: Literal["files", "hub", "builtin"]
    subset: str | None = None
    """Hub dataset configuration."""
    split: str = "train"
    """Hub dataset split."""

    @property
    def part(self) -> builtin.Part | None:
        return builtin.resolve(self.spec)[1][0] if self.kind == "builtin" else None

    @property
    def doc_tokens(self) -> int | None:
        """Tokens read from each document at most (built-in parts), else None."""
        part = self.part
        return part.doc_tokens if part is not None else None

    def data(self, quiet: bool = False) -> DataConfig:
        """Where the documents come from (a built-in part is fetched here, once)."""
        part = self.part
        if part is not None:
            return part.data(quiet)
        if self.kind == "hub":  # streamed: readers need the first tokens, not the whole dataset
            return DataConfig(dataset=self.spec, name=self.subset, split=self.split, streaming=True)
        return DataConfig(files=[self.spec])

    def check(self, what: str) -> None:
        """What can be checked without reading them whole: that local files exist, are files (a folder is refused
        with the glob that reads it) and, but for parquet, begin as UTF-8 text."""
        if self.kind != "files":
            return
        folder = Path(self.spec).expanduser()
        if folder.is_dir():
            found = itertools.islice(folder.rglob("*"), 10_000)  # enough to tell what it holds
            suffixes = Counter(p.suffix.lower() for p in found if p.suffix.lower() in FORMATS)
            suffix = max(suffixes, key=lambda x: (suffixes[x], x == ".txt")) if suffixes else ".txt"
            deep = "/**" if not any(folder.glob(f"*{suffix}")) and suffixes else ""
            raise UptrainError(
                f"{what} {self.spec} is a folder; name its files with a glob, quoted so that uptrain expands it: "
                f"'{self.spec.rstrip('/')}{deep}/*{suffix}'"
            )
        for path in expand_files([self.spec], what):
            if FORMATS.get(Path(path).suffix.lower()) in ("text", "json"):
                _check_text(path, what)

    def record(self) -> dict[str, object]:
        out: dict[str, object] = {"label": self.label, "data": self.spec, "kind": self.kind}
        if self.kind == "hub":
            out |= {"subset": self.subset, "split": self.split}
        if self.kind == "builtin":
            out["license"] = self.part.corpus.license  # type: ignore[union-attr]
        return out


SNIFFED = 1 << 16
"""Bytes of each text file read before any work to tell text from binary."""


def _check_text(path: str, what: str) -> None:
    """Refuse a file that does not begin as UTF-8 text (a compressed or binary file under a text name): its
    first `SNIFFED` bytes decode as UTF-8 and hold no NUL byte."""
    import codecs

    try:
        with open(path, "rb") as f:
            head = f.read(SNIFFED)
    except OSError as e:
        raise UptrainError(f"{what} {path}: cannot read it ({e.strerror or e})") from e
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
        binary = b"\0" in head
    except UnicodeDecodeError:
        binary = True
    if binary:
        compressed = head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd", b"PK\x03\x04"))
        raise UptrainError(
            f"{what} {path} is not text (UTF-8): it looks {'compressed' if compressed else 'binary'}; pass "
            f"{'it decompressed' if compressed else 'plain text'} (UTF-8), .jsonl or .parquet"
        )


def _label_of(spec: str, kind: str) -> str:
    """A report label for unlabelled DATA: the dataset's name, a file's stem, or the folder a glob reads."""
    if kind == "hub":
        base = spec.rsplit("/", 1)[-1]
    else:
        parts = Path(spec).parts
        plain = [p for p in parts if not any(c in p for c in "*?[")]
        if len(plain) == len(parts) and not Path(spec).expanduser().is_dir():
            base = Path(spec).stem  # one file
        else:
            base = plain[-1] if plain else "text"
    return re.sub(r"[^\w.-]+", "-", base).strip("-.") or "text"


def parse_sources(items: Sequence[str], what: str, subset: str | None = None, split: str = "train") -> list[TextSource]:
    """The texts `items` name, each `[LABEL[:WEIGHT]=]DATA`; built-in sets expand into their parts. Labels are
    made unique; raises on a bad weight, an unknown built-in name or a duplicate label given twice."""
    out: list[TextSource] = []
    given: set[str] = set()
    for item in items:
        label, weight, spec = None, 1.0, item
        named = None if Path(item).expanduser().exists() else _NAMED.match(item)
        if named:
            label, spec = named["label"], named["data"]
            if named["weight"] is not None:
                try:
                    weight = float(named["weight"])
                except ValueError:
                    weight = math.nan
            if label in given:
                raise UptrainError(f"{what}: the label {label!r} is given twice; give each text its own")
            given.add(label)
        if not (math.isfinite(weight) and weight > 0):
            raise UptrainError(f"{what} {item}: the weight must be a positive number, as in LABEL:0.3=DATA")
        kind = data_kind(spec)
        if kind == "builtin":
            set_name, parts = builtin.resolve(spec)
            total = sum(p.weight for p in parts)
            for p in parts:
                name = p.label if label is None else label if len(parts) == 1 else f"{label}.{p.label}"
                out.append(TextSource(name, weight * p.weight / total, f"{builtin.PREFIX}{set_name}.{p.label}", kind))
        else:
            out.append(TextSource(label or _label_of(spec, kind), weight, spec, kind, subset, split))
    return _unique(out)


def _unique(sources: list[TextSource]) -> list[TextSource]:
    seen: dict[str, int] = {}
    out = []
    for s in sources:
        n = seen.get(s.label, 0)
        seen[s.label] = n + 1
        out.append(s if n == 0 else TextSource(f"{s.label}-{n + 1}", s.weight, s.spec, s.kind, s.subset, s.split))
    return out
