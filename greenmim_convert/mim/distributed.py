"""Processes of a pre-training job: rank and device under torchrun, DistributedDataParallel, FSDP2 sharding, and
the full (unsharded) states that checkpoints hold."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    """Where this process stands in the job: rank, world size, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def wrap_ddp(model: nn.Module, d: Dist) -> nn.Module:
    """DistributedDataParallel without per-step buffer syncing (the buffers are constant index tables)."""
    ddp_cls = nn.parallel.DistributedDataParallel
    no_sync_buffers = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp_cls).parameters
        else {"broadcast_buffers": False}
    )
    return ddp_cls(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **no_sync_buffers)


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` of the MIM model, encoder and decoder in one unit.

    Parameters become DTensors sharded over the ranks; each forward all-gathers them and the backward
    reduce-scatters the gradients. The encoder is not a unit of its own: FSDP2 hooks the backward on the tensors
    it finds in a unit's output, and a converted encoder returns a GreenOutput, which it cannot look into. The
    converted graphs read the source model's own modules (``convert`` points them there), so the unsharded
    Parameters FSDP2 swaps in reach them. The model is sharded in place and returned.
    """
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor over all ranks (itself when not distributed)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


def gather_objects(mine: Any, d: Dist) -> List[Any]:
    """Every rank's ``mine``, in rank order (a collective: all ranks must call it)."""
    if not d.enabled:
        return [mine]
    out: List[Any] = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module, fsdp: bool) -> Dict[str, Any]:
    """The model's full state dict (gathered from the shards under FSDP2: a collective then)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> Dict[str, Any]:
    """The optimizer's full state dict (gathered under FSDP2, keyed by parameter name)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: Dict[str, Any], optim_sd: Dict[str, Any], fsdp: bool
) -> None:
    """Load full model and optimizer states (sharding them under FSDP2)."""
    if not fsdp:
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_sd, options=_options())
    set_optimizer_state_dict(model, optimizer, optim_sd, options=_options())
