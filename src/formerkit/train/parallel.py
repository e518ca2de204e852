"""Data parallelism (DDP), sharding (FSDP), compilation, and the state they need gathered for checkpoints."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from formerkit.errors import ConfigError
from formerkit.model import Transformer
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo


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


def _reshard(model: nn.Module) -> None:
    """Put a sharded model back in its sharded state.

    FSDP leaves the root module's parameters gathered after a forward pass that no backward
    follows (evaluation); the optimizer refers to the sharded ones.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of a tensor that may be sharded (every process must call this for a DTensor)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def _placed_like(saved: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``saved`` (a whole tensor) moved to ``param``'s device, and sharded like it when it is a DTensor."""
    if isinstance(param, DTensor) and saved.dim() > 0:
        return distribute_tensor(saved.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return saved.to(param.device) if saved.dim() > 0 else saved


def optimizer_state(model: Transformer, optimizer: torch.optim.Optimizer) -> dict:
    """The whole (unsharded) optimizer state, keyed by parameter name, plus the group settings."""
    _reshard(model)
    names = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    state = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if optimizer.state.get(param):
                state[names[id(param)]] = {k: _gathered(v) for k, v in optimizer.state[param].items()}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {"state": state, "groups": groups}


KERNEL_SETTINGS = ("fused", "foreach", "capturable", "differentiable")  # how a step runs, not what it computes


def load_optimizer_state(model: Transformer, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Restore what ``optimizer_state`` saved, sharding it again where the parameters are sharded.

    The hyperparameters come back; the kernel settings stay the ones ``optimizer`` was built with (a
    resumed run may measure another AdamW kernel faster, and a gradient scaler checks the built one).
    """
    params = dict(model.named_parameters())
    for name, values in saved["state"].items():
        param = params[name]
        optimizer.state[param] = {k: _placed_like(v, param) for k, v in values.items()}
    for group, settings in zip(optimizer.param_groups, saved["groups"], strict=True):
        group.update({k: v for k, v in settings.items() if k not in KERNEL_SETTINGS})


def full_model(model: Transformer, info: DistInfo, cfg: TrainConfig) -> Transformer:
    """A model holding every weight, for rank 0 to save (a gathered copy when sharded)."""
    if not cfg.train.fsdp:
        return model
    _reshard(model)
    state = {name: _gathered(t) for name, t in model.state_dict().items()}  # every process takes part
    copy = Transformer(model.config)
    copy.load_state_dict(state)
    return copy
