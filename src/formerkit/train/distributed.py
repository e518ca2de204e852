"""Process-group setup for torchrun: rank, world size, device, and the few collectives training needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from formerkit.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits: rank among world_size, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints."""
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """Resolve 'auto' | 'cpu' | 'cuda' | 'cuda:N' to a device, checking that it exists."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={preference!r} but CUDA is not available; use --train.device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup(preference: str) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def mean_across(value: float, info: DistInfo) -> float:
    """Average a Python float over all processes (identity for a single process)."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world_size


def broadcast_object(value, info: DistInfo):
    """Rank 0's ``value`` on every process (picklable; the value itself for a single process)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for a single process)."""
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Leave the process group if this process joined one."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
