"""FSDP2 for `uptrain train`: torch's `fully_shard`, the same way on GPUs and CPUs.

The mechanics behind uptrain_gqa.training.parallel.FullyShard (which says why uptrain, not
accelerate, shards), in the order a run uses them:
- `ShardingPlan`: the launcher's FSDP settings;
- `shard_model` puts each decoder layer and then the root (embeddings, final norm, head) in its own
  FSDP unit; rank 0 alone reads the checkpoint, every other rank builds the model on the meta
  device, and the weights are broadcast from rank 0 into the shards; a distillation teacher is sharded
  the same way (forward only), so no rank holds a whole second model, and no checkpoint holds it;
- `clip_grad_norm` clips over the sharded gradients (one global norm);
- `ShardedState` saves and loads model + optimizer as a torch.distributed.checkpoint (DCP) folder,
  each rank writing its own shard;
- `full_state_dict` gathers the final weights on rank 0 (in CPU memory) for safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.errors import UptrainError

SHARDED_FOLDER = "sharded"
"""Inside a step checkpoint: the DCP folder (a .metadata file and one __<rank>_0.distcp file per rank)."""


@dataclass(frozen=True)
class ShardingPlan:
    """How to shard, as `accelerate launch` passed it on (configs/accelerate/fsdp2.yaml, fsdp_config)."""

    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (less memory, one more all-gather in backward)."""
    offload_params: bool = False
    """Keep the shards, gradients and optimizer state in CPU memory (GPUs only; slower)."""
    cpu_ram_efficient_loading: bool = True
    """Only rank 0 reads the checkpoint; the other ranks start on the meta device and receive the weights."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (same as model.gradient_checkpointing)."""
    layer_classes: tuple[str, ...] = ()
    """Module classes that become FSDP units; empty = the model's own `_no_split_modules` (its decoder layer)."""


def mixed_precision_policy(precision: str) -> Any:
    """bf16 compute and gathers with fp32 gradient reduction and fp32 master weights; 'no' keeps fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "no":
        return MixedPrecisionPolicy()
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise UptrainError(f"mixed_precision {precision} is not supported with FSDP2; use bf16 (or no)")


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied input and output embeddings), each group in model order."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def shard_model(
    model: torch.nn.Module,
    plan: ShardingPlan,
    *,
    device: torch.device,
    precision: str,
    main_process: bool,
    frozen: bool = False,
) -> torch.nn.Module:
    """Shard `model` in place over every process and fill the shards from rank 0's weights.

    On rank 0 `model` holds the real weights (on the CPU); on the other ranks it may live on the meta
    device. Returns the same module, now an FSDP module whose parameters are DTensor shards on `device`.
    `frozen`: a model that only runs forward (the distillation teacher): every unit, the root too, frees
    its gathered weights after its forward, since no backward will need them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise UptrainError("FSDP2 needs a process group; start the run with accelerate launch or torchrun")
    world = dist.get_world_size()
    classes = set(plan.layer_classes or getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise UptrainError(
            f"no module of class {', '.join(sorted(classes)) or '(none given)'} in {type(model).__name__}; "
            "set fsdp_transformer_layer_cls_to_wrap to its decoder layer class"
        )
    # rank 0's full weights and buffers (rotary tables are buffers outside the state dict) stay
    # referenced here while fully_shard replaces the module's parameters by shards
    full = model.state_dict() if main_process else {}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if main_process else {}
    tied = tied_names(model)
    offload = CPUOffloadPolicy() if plan.offload_params and device.type == "cuda" else OffloadPolicy()
    options = dict(
        mesh=init_device_mesh(device.type, (world,)),
        reshard_after_forward=plan.reshard_after_forward,
        mp_policy=mixed_precision_policy(precision),
        offload_policy=offload,
    )
    if frozen:
        options["reshard_after_forward"] = True
    for layer in layers:
        fully_shard(layer, **options)
    # the root unit (embeddings, final norm, tied head) of a trained model stays gathered after forward:
    # backward needs it at once, and the chunked loss reads the head weight outside the forward
    fully_shard(model, **{**options, "reshard_after_forward": frozen})
    model.to_empty(device="cpu" if plan.offload_params and device.type == "cuda" else device)
    if tied_names(model) != tied:
        model.tie_weights()
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    for name, b in model.named_buffers():
        if main_process:
            b.copy_(buffers[name])
        dist.broadcast(b, src=0)
    return model


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip every gradient by one global norm over all shards; returns that norm (a plain tensor)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):  # a partial sum over the shards: reduce it to the global norm
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def local_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model): the proof that it is sharded."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total


class ShardedState:
    """Model and optimizer state of a sharded run as a DCP folder: every rank writes and reads its part."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model, "optimizer": optim}, checkpoint_id=str(folder / SHARDED_FOLDER))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (folder / SHARDED_FOLDER / ".metadata").is_file():
            raise UptrainError(
                f"{folder} is not a sharded (FSDP2) checkpoint; resume it with the launcher it was saved with"
            )
        check_sharded_metadata(folder)
        model, optim = get_state_dict(self.model, self.optimizer)
        state = {"model": model, "optimizer": optim}
        dcp.load(state, checkpoint_id=str(folder / SHARDED_FOLDER))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def check_sharded_metadata(checkpoint: Path) -> None:
    """Read a sharded checkpoint's DCP .metadata first, ourselves: when it is damaged, dcp.load logs a
    traceback on the root logger before it raises."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.FileSystemReader(str(checkpoint / SHARDED_FOLDER)).read_metadata()
    except Exception as e:
        raise UptrainError(
            f"{checkpoint / SHARDED_FOLDER / '.metadata'} is damaged ({type(e).__name__}); use another checkpoint"
        ) from e


def full_state_dict(model: torch.nn.Module, main_process: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, in CPU memory (an empty dict on the other ranks); tied
    names point at one tensor again, as in the unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main_process:
        for first, *others in tied_names(model):
            for name in others:
                state[name] = state[first]
    return state if main_process else {}
