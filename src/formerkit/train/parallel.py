"""Data parallelism (DDP), sharding (FSDP), compilation, and the state they need gathered for checkpoints."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from formerkit.errors import ConfigError
from formerkit.model import Transformer
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Wrapped:
    """The module the loop calls (compiled and/or DDP-wrapped) and the DDP wrapper, if any."""

    module: nn.Module
    ddp: DistributedDataParallel | None
    fsdp: bool

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        """Put the model in training mode."""
        self.module.train()

    def eval(self) -> None:
        """Put the model in evaluation mode."""
        self.module.eval()


def shard(model: Transformer, cfg: TrainConfig, info: DistInfo) -> None:
    """With ``train.fsdp``, shard every block and then the whole model across processes, in place."""
    if not cfg.train.fsdp:
        return
    if not info.enabled:
        raise ConfigError("train.fsdp=true needs several processes: launch with torchrun --nproc_per_node N")
    from torch.distributed.fsdp import fully_shard

    stacks = [model.encoder, model.decoder] if model.config.kind == "encoder-decoder" else [model]
    for stack in stacks:
        for block in stack.blocks:
            fully_shard(block)
    fully_shard(model)


def wrap(model: Transformer, cfg: TrainConfig, info: DistInfo) -> Wrapped:
    """DDP-wrap (several processes, no FSDP) and then compile (``train.compile``) the model."""
    ddp = None
    module: nn.Module = model
    if info.enabled and not cfg.train.fsdp:
        ddp = DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None)
        module = ddp
    if cfg.train.compile:
        module = torch.compile(module)
    return Wrapped(module=module, ddp=ddp, fsdp=cfg.train.fsdp)


def maybe_no_sync(wrapped: Wrapped, *, skip: bool):
    """Context that skips the gradient all-reduce of a micro-step that is not the last of its step."""
    if wrapped.ddp is not None and skip:
        return wrapped.ddp.no_sync()
    if wrapped.fsdp:
        model = wrapped.module._orig_mod if hasattr(wrapped.module, "_orig_mod") else wrapped.module
        model.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


def clip(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping); return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def optimizer_state(model: Transformer, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """The optimizer state to checkpoint: the whole (unsharded) state, keyed by parameter name."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: Transformer, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore what ``optimizer_state`` saved (works sharded or not)."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def full_model(model: Transformer, info: DistInfo, cfg: TrainConfig) -> Transformer:
    """A model holding every weight, for rank 0 to save (a gathered copy when sharded)."""
    if not cfg.train.fsdp:
        return model
    state = get_model_state_dict(model, options=_FULL)  # every process must take part
    if not info.is_main:
        return model
    copy = Transformer(model.config)
    copy.load_state_dict(state, strict=False)
    return copy
