"""AdamW with weight-decay groups, and the learning-rate schedules: warmup + cosine, warmup + inverse square root."""

from __future__ import annotations

import math

import torch
from torch import nn

from formerkit.train.config import OptimSection


def decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (decayed, not decayed).

    Matrices of Linear layers decay; biases, norm weights and embedding tables do not.
    A tied parameter is listed once.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimSection, kernel: str | None = None) -> torch.optim.AdamW:
    """AdamW over the two decay groups with ``kernel`` "fused" or "foreach" (None: fused on CUDA, else foreach)."""
    decay, no_decay = decay_groups(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kernel is None:
        kernel = "fused" if all(p.is_cuda for p in decay + no_decay) else "foreach"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **{kernel: True})


def inverse_sqrt_lr(step: int, peak: float, warmup_steps: int) -> float:
    """``peak * min(s / warmup, sqrt(warmup / s))`` for s = step + 1: linear warmup, then decay as 1 / sqrt(s).

    The original Transformer's ``d_model ** -0.5 * min(s ** -0.5, s * warmup ** -1.5)`` is this
    with ``peak = (d_model * warmup) ** -0.5``.
    """
    s = step + 1
    return peak * min(s / warmup_steps, math.sqrt(warmup_steps / s))


def lr_at(step: int, cfg: OptimSection, total_steps: int) -> float:
    """Learning rate for 0-based ``step`` under ``cfg.schedule``.

    cosine: linear warmup to ``lr``, then cosine to ``lr * min_lr_ratio`` at ``total_steps``.
    inverse_sqrt: see ``inverse_sqrt_lr``.
    """
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt_lr(step, cfg.lr, cfg.warmup_steps)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
