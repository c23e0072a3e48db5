"""Resolve SRC: a local checkpoint folder, or a Hugging Face Hub repo id fetched on demand.

From the hub only what a conversion needs is downloaded: config, tokenizer and generation
files, the weight index, and exactly the shards it lists (repos often also carry duplicate
weights in other formats, e.g. `consolidated.safetensors` or `original/`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import links_leaving_folder
from uptrain_gqa.io.tensors import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE

LICENSE_PATTERNS = ["LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "COPYING*"]
"""Licence files a model's terms may require to travel with it (Llama-2's do)."""
SMALL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "README.md",
    *LICENSE_PATTERNS,
    SAFE_INDEX,
    PICKLE_INDEX,
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class Source:
    """Where a checkpoint came from, as recorded in conversion reports."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def record(self) -> dict[str, Any]:
        """How records name the source: its local path, or repo id, revision and commit."""
        if self.repo_id is None:
            return {"path": str(self.path)}
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit}

    def __str__(self) -> str:
        return str(self.path) if self.repo_id is None else f"{self.repo_id}@{(self.commit or '')[:10]}"


def resolve_source(src: str, revision: str | None = None) -> Source:
    """A local folder as is; otherwise a Hub repo id, of which only config, tokenizer and index
    files are downloaded here (`fetch_weights` gets the weights once the config has been checked)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UptrainError(f"{src} is a file; SRC must be a checkpoint folder or a Hub repo id")
        if revision is not None:
            raise UptrainError("--revision applies to Hub repo ids only; SRC is a local folder")
        return Source(path.resolve())
    if not looks_like_repo_id(src):
        raise UptrainError(f"{src}: no such folder (and not a Hugging Face Hub repo id like org/name)")
    folder = _download(src, revision, SMALL_FILES)
    return Source(folder, repo_id=src, revision=revision, commit=folder.name)  # snapshots are named by commit


def looks_like_repo_id(src: str) -> bool:
    """'org/name' or 'name' (not a path that merely does not exist)."""
    return bool(_REPO_ID.match(src)) and not src.startswith((".", "~"))


def fetch_weights(source: Source, allow_pickle: bool = False) -> Source:
    """Download the weight files of a Hub source, pinned to the commit its config came from."""
    if source.repo_id is None:
        return source
    files = _weight_files(source.path, allow_pickle)
    folder = _download(source.repo_id, source.commit, SMALL_FILES + files)
    return Source(folder, source.repo_id, source.revision, source.commit)


def _weight_files(folder: Path, allow_pickle: bool) -> list[str]:
    """The weight files to fetch: the shards an index lists, else the single-file name(s)."""
    indexes = [SAFE_INDEX, PICKLE_INDEX] if allow_pickle else [SAFE_INDEX]
    for index in indexes:
        if (folder / index).is_file():
            return sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    return [SAFE_SINGLE, PICKLE_SINGLE] if allow_pickle else [SAFE_SINGLE]


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise UptrainError(
            f"{repo_id} is not a local folder, the Hugging Face Hub cannot be reached, and no cached copy "
            f"exists; download it where the Hub is reachable (`hf download {repo_id}`) and pass the folder"
        ) from e
    except GatedRepoError as e:
        raise UptrainError(f"{repo_id} is gated: accept its licence on the Hub, then `hf auth login`") from e
    except RevisionNotFoundError as e:
        raise UptrainError(f"{repo_id} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise UptrainError(
            f"{repo_id} is neither a local folder nor a Hub repo you can access (private repos need `hf auth login`)"
        ) from e
    except HfHubHTTPError as e:
        raise UptrainError(f"the Hub refused {repo_id}: {str(e).splitlines()[0]}") from e


def hub_tensor_headers(repo_id: str, revision: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Safetensors headers of a hub repo (range requests, no weights downloaded): name -> (dtype, shape)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError as e:
        raise UptrainError(f"{repo_id} has no safetensors weights (pickle only?)") from e
    except Exception as e:  # network failures come in several types
        raise UptrainError(f"cannot read safetensors headers of {repo_id}: {str(e).splitlines()[0]}") from e
    return {
        name: (info.dtype, tuple(info.shape))
        for file in meta.files_metadata.values()
        for name, info in file.tensors.items()
    }


def check_push(repo_id: str | None) -> None:
    """Refuse a --push-to-hub that cannot work, before any work: a malformed repo id, or offline mode."""
    import os

    if repo_id is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not looks_like_repo_id(repo_id) or "/" not in repo_id:
        raise UptrainError(f"--push-to-hub {repo_id}: give a repo id like your-name/model-gqa8")
    try:  # the Hub's own rules (no '--' or '..', no '.git' ending, at most 96 characters...)
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UptrainError(f"--push-to-hub {repo_id}: {str(e).splitlines()[0]}") from e
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise UptrainError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it, or push the folder later")


def _network_error(e: BaseException) -> bool:
    """A connection that failed: an OSError, or one of the Hub client's own transport errors (httpx and its
    fork name them TransportError, requests ConnectionError/Timeout), which are not OSErrors."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout"})


def push_folder(folder: Path, repo_id: str, *, private: bool = True, message: str = "uptrain") -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created private unless it exists); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_push(repo_id)
    for path, target in links_leaving_folder(Path(folder)):  # the upload would carry the file it leads to
        raise UptrainError(
            f"--push-to-hub {repo_id}: {path.relative_to(folder)} links outside {folder} (to {target}); uptrain "
            "uploads only the folder's own files: replace the link with a copy, then upload it with `hf upload`"
        )
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except HfHubHTTPError as e:
        raise UptrainError(f"the Hub refused --push-to-hub {repo_id}: {str(e).splitlines()[0]}") from e
    except Exception as e:
        if not _network_error(e):
            raise
        raise UptrainError(
            f"cannot reach the Hugging Face Hub to push {repo_id} ({str(e).splitlines()[0]}); {folder} is complete "
            "locally: upload it later with `hf upload`"
        ) from e
    return f"https://huggingface.co/{repo_id}"
