"""Documents: a Hub dataset or local .txt/.jsonl/.parquet files, through `datasets`; and token streams of them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.data.config import DataConfig, check_validation_split, expand_files, training_paths
from uptrain_gqa.errors import UptrainError

PLAIN_TEXT = (".txt", ".text", ".md", ".rst", ".tex", ".html", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".js",
              ".ts", ".java", ".go", ".rs", ".sh", ".yml", ".yaml", ".toml", ".css")  # fmt: skip
"""Suffixes read as plain text (documents, prose, markup and source code)."""
FORMATS = dict.fromkeys(PLAIN_TEXT, "text") | {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _builder(files: list[str], what: str) -> str:
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise UptrainError(
            f"{what}: cannot read {bad}; use .jsonl/.json, .parquet or plain-text files ({', '.join(PLAIN_TEXT)})"
        )
    if len(kinds) > 1:
        raise UptrainError(f"{what} mixes formats ({', '.join(sorted(kinds))}); use one format per list")  # type: ignore[arg-type]
    return kinds.pop()  # type: ignore[return-value]


def load_documents(
    cfg: DataConfig,
    validation: bool = False,
    streaming: bool | None = None,
    *,
    where: str = "data",
    held: dict[str, str] | None = None,
) -> Any:
    """The raw documents (train or validation) as a datasets Dataset / IterableDataset, or None
    when no validation source is configured. Training never reads validation: files that are also
    validation files (this source's, or any of `held`, by resolved path: `validation_paths`) are left
    out, and a Hub validation split that is the training split is refused. `where`: the source's
    section in messages (data, or data.mixture[LABEL])."""
    import datasets

    if cfg.mixture:
        raise UptrainError("data.mixture is read source by source; here give one source (data.dataset or data.files)")
    streaming = cfg.streaming if streaming is None else streaming
    files = cfg.validation_files if validation else cfg.files
    try:
        if cfg.dataset is None or files:
            if not files:
                return None
            what = f"{where}.validation_files" if validation else f"{where}.files"
            paths = expand_files(files, what) if validation else training_paths(cfg, where, held)[0]
            builder = _builder(paths, what)
            kwargs: dict[str, Any] = {"sample_by": cfg.txt_documents.replace("file", "document")}
            return datasets.load_dataset(
                builder,
                data_files=paths,
                split="train",
                streaming=streaming,
                cache_dir=cfg.cache_dir,
                **(kwargs if builder == "text" else {}),
            )
        check_validation_split(cfg, where)
        split = cfg.validation_split if validation else cfg.split
        if split is None:
            return None
        return datasets.load_dataset(
            cfg.dataset, cfg.name, split=split, revision=cfg.revision, streaming=streaming, cache_dir=cfg.cache_dir
        )
    except UptrainError:
        raise
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        source = cfg.dataset or ", ".join(files)
        raise UptrainError(f"cannot load {source}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, hub errors, ...)
        source = cfg.dataset or ", ".join(files)
        raise UptrainError(f"cannot load {source}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def texts(values: list[Any], column: str) -> list[str]:
    """A batch of a document column, refused in one line unless every value is a string (JSON null or a
    number in a .jsonl would otherwise reach the tokenizer and end in a traceback)."""
    for value in values:
        if not isinstance(value, str):
            shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
            raise UptrainError(
                f"a document's '{column}' is {shown}, not text; every document needs a string in column "
                f"'{column}': fix or drop those rows (or set the text column)"
            )
    return values


def packer(tokenizer: Any, text_column: str, seq_len: int) -> Callable[[dict[str, list]], dict[str, list]]:
    """A batched map function: documents -> tokens (+EOS after each) -> whole blocks of seq_len.
    The tail that does not fill a block is dropped (at most seq_len - 1 tokens per map batch)."""
    eos = tokenizer.eos_token_id

    def pack(batch: dict[str, list]) -> dict[str, list]:
        docs = tokenizer(texts(batch[text_column], text_column), add_special_tokens=True, return_attention_mask=False)
        docs = docs["input_ids"]
        stream = list(itertools.chain.from_iterable(d if d and d[-1] == eos else [*d, eos] for d in docs))
        usable = len(stream) // seq_len * seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}

    return pack


def require_column(ds: Any, column: str) -> None:
    """Refuse data without the text column, naming the columns it has (streams may not know theirs: None)."""
    names = ds.column_names
    if names is not None and column not in names:
        raise UptrainError(f"the data has no column '{column}' (columns: {', '.join(names)}); set data.text_column")


def token_stream(
    cfg: DataConfig, tokenizer: Any, max_tokens: int, doc_tokens: int | None = None
) -> tuple[torch.Tensor, str]:
    """Documents -> one stream of at most max_tokens tokens (EOS after each document; with `doc_tokens`, at
    most that many of each document's tokens)."""
    docs = load_documents(cfg, validation=bool(cfg.validation_split or cfg.validation_files))
    if docs is None:
        raise UptrainError("no evaluation text: give --data.files=..., --data.dataset=... or --config RUN.yaml")
    eos, stream, batch = tokenizer.eos_token_id, [], []
    names = getattr(docs, "column_names", None)
    if names is not None and cfg.text_column not in names:
        columns = ", ".join(names)
        raise UptrainError(f"the data has no column '{cfg.text_column}' (columns: {columns}); set its text column")

    def add(batch: list[str]) -> None:
        if doc_tokens is not None:  # no need to tokenize what is cut off (tokens average far below 32 characters)
            batch = [text[: 32 * doc_tokens] for text in batch]
        stream.extend(t for ids in tokenizer(batch)["input_ids"] for t in (*ids[:doc_tokens], eos))

    for doc in docs:
        batch.append(texts([doc[cfg.text_column]], cfg.text_column)[0])
        if len(batch) == 256:
            add(batch)
            batch = []
            if len(stream) >= max_tokens:
                break
    if batch and len(stream) < max_tokens:
        add(batch)
    source = f"Hub dataset {cfg.dataset}" + (f" ({cfg.name})" if cfg.name else "") if cfg.dataset else "files"
    split = cfg.validation_split or cfg.split if cfg.dataset else ", ".join(cfg.validation_files or cfg.files)
    return torch.tensor(stream[:max_tokens], dtype=torch.long), f"{source}: {split}"
