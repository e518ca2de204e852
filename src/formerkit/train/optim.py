"""AdamW with weight-decay groups, and the learning-rate schedules: warmup + cosine, warmup + inverse square root."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from formerkit.errors import ConfigError
from formerkit.train.config import OptimSection, TrainConfig


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


@dataclass(frozen=True)
class Schedule:
    """Where the learning-rate schedule runs: warmup from step ``start``, decay ending at step ``end``.

    A new run's schedule spans (0, train.steps); ``optim.schedule_restart`` on a resumed run
    starts a new one at the resume step.
    """

    start: int
    end: int

    def lr(self, step: int, cfg: OptimSection) -> float:
        """The learning rate of 0-based ``step`` of the run."""
        return lr_at(step - self.start, cfg, self.end - self.start)

    def saved(self) -> dict[str, int]:
        """The schedule as a checkpoint stores it."""
        return {"start": self.start, "end": self.end}

    def describe(self, cfg: OptimSection) -> str:
        """A phrase for the plan line: where the schedule starts when it does not start at step 0."""
        return f"; {cfg.schedule} schedule restarted at step {self.start}" if self.start else ""


def resume_schedule(state: dict, cfg: TrainConfig, run_dir: Path) -> Schedule:
    """The schedule a resumed run continues with, from its checkpoint ``state`` and the current ``cfg``.

    The run's own schedule when ``train.steps`` is unchanged; with ``optim.schedule_restart`` a
    new warmup + decay from the resume step to ``train.steps``. Changing ``train.steps`` of a
    cosine schedule without it is a ConfigError saying both ways on (the learning rate would jump).
    """
    step, steps = int(state["step"]), cfg.train.steps
    saved = state.get("schedule") or {"start": 0, "end": state.get("config", {}).get("train", {}).get("steps", steps)}
    if cfg.optim.schedule_restart:
        if steps <= step:
            raise ConfigError(f"--optim.schedule_restart needs --train.steps beyond the resume step {step}, "
                              f"got {steps}")
        return Schedule(step, steps)
    if saved["end"] != steps and cfg.optim.schedule == "cosine":
        raise ConfigError(f"{run_dir} was planned for {saved['end']} steps (its cosine schedule ends there) and is at "
                          f"step {step}; to train it to {steps} steps add --optim.schedule_restart true (a new warmup "
                          f"and cosine from step {step} to {steps}), or start a new run from its weights with "
                          f"--model.init_from {run_dir} --checkpoint.run_dir NEW_DIR")
    return Schedule(saved["start"], steps)
