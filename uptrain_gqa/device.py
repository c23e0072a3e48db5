"""Where uptrain computes and in which precision: the one place that decides it.

Every room asks here instead of testing `torch.cuda.is_available()` itself: calibration and
evaluation run on the first GPU in bfloat16 when there is one (float32 on a CPU), training
autocasts to bf16 where the accelerator supports it, and several processes on a machine without
GPUs join one gloo group.
"""

from __future__ import annotations

import contextlib
import os

import torch

from uptrain_gqa.errors import UptrainError

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def compute_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def inference_dtype(device: torch.device, requested: str = "auto", cpu: torch.dtype = torch.float32) -> torch.dtype:
    """dtype to run a model in without training it: `requested`, or for 'auto' bfloat16 on CUDA and `cpu` elsewhere."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else cpu


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on `device` now: free GPU memory, or the memory the kernel can give without
    swapping (MemAvailable; page cache counts as free); None where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the execution device of its input embedding when accelerate placed the model
    over several devices (`device_map`; its hooks move activations on), else the device of its parameters."""
    get = getattr(model, "get_input_embeddings", None)
    hook = getattr(get(), "_hf_hook", None) if get is not None else None
    where = getattr(hook, "execution_device", None)
    if where is not None:
        return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)
    return next(model.parameters()).device


def autocast_precision(setting: str) -> str:
    """accelerate's mixed_precision for training: 'auto' is bf16 where the accelerator supports it, else 'no'."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _launcher_count(name: str, default: int) -> int:
    """A count a launcher exported (WORLD_SIZE, RANK, ...); unset or empty: `default`."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise UptrainError(
            f"{name}={value!r} is not a process count or rank; unset it, or let the launcher (torchrun, "
            "accelerate launch, srun) set it"
        )
    return count


def check_launch_environment() -> None:
    """Refuse malformed launcher variables before any work (they are read again when a run is recorded)."""
    for name in (*WORLD_SIZE_VARIABLES, "RANK"):
        _launcher_count(name, 0)


def launched_processes() -> int:
    """Processes in this job, as the launcher (torchrun, accelerate, mpirun) announced them."""
    return max(_launcher_count(k, 1) for k in WORLD_SIZE_VARIABLES)


def multi_process_cpu() -> bool:
    """Several processes on a machine without GPUs: accelerate needs cpu=True to join them into one
    gloo group instead of running each alone."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def is_main_process() -> bool:
    """Rank 0 of the job, or the only process."""
    try:
        return _launcher_count("RANK", 0) == 0
    except UptrainError:  # reported by check_launch_environment; this only chooses who prints
        return True


def device_name(device: torch.device) -> str:
    """'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (16 cores)', as recorded next to every measurement."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "lm_eval",
)


def _machines() -> int | str:
    """Machines in the job as the launcher or the user's script says (NNODES may be torchrun's '1:4' range)."""
    value = (os.environ.get("GROUP_WORLD_SIZE") or os.environ.get("NNODES") or "1").strip()
    return int(value) if value.isdigit() else value


def environment() -> dict[str, object]:
    """What this process runs on, for run records and `uptrain env`: versions, devices, processes."""
    import importlib.metadata
    import platform

    from uptrain_gqa.version import DISTRIBUTION, __version__

    versions: dict[str, str | None] = {DISTRIBUTION: __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_count": os.cpu_count(),
        "processes": launched_processes(),
        "machines": _machines(),
    }
