"""What the experiments share: formerkit's AdamW and schedule in a short loop, a table printer, PNG curves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from formerkit.train.config import OptimSection
from formerkit.train.optim import build_optimizer, lr_at
from formerkit.train.trainer import apply_gradients

LossFn = Callable[[int], torch.Tensor]  # step -> the loss of that step's batch (graph attached)


def fit(model: nn.Module, loss_at: LossFn, steps: int, *, lr: float, warmup: int = 0, weight_decay: float = 0.0,
        grad_clip: float = 1.0, min_lr_ratio: float = 0.1, on_step: Callable[[int, float], None] | None = None,
        ) -> list[float]:
    """Train ``model`` for ``steps`` with formerkit's AdamW (decay groups), warmup + cosine and gradient clipping.

    ``loss_at(step)`` builds the step's batch and returns its loss. Returns the loss of every step;
    a non-finite loss stops training early (the returned list then ends with it).
    """
    cfg = OptimSection(lr=lr, warmup_steps=max(1, warmup), weight_decay=weight_decay, grad_clip=grad_clip,
                       min_lr_ratio=min_lr_ratio, beta2=0.98)
    optimizer = build_optimizer(model, cfg, kernel="foreach")
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, steps)
        loss = loss_at(step)
        loss.backward()
        apply_gradients(model, optimizer, grad_clip)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if not torch.isfinite(loss):
            break
    model.eval()
    return losses


def format_table(rows: Sequence[Sequence[Any]]) -> str:
    """The rows (first: the header) as aligned plain-text columns; floats with 4 significant digits."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in text) for i in range(len(text[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def line_png(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
             title: str, logx: bool = False, logy: bool = False, hline: float | None = None) -> Path:
    """Write a PNG with one line per ``series`` entry (label -> (xs, ys)); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if len(xs) < 30 else None, label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_png(path: Path, panels: dict[str, dict[str, float]], *, title: str = "") -> Path:
    """Write a PNG with one bar chart per ``panels`` entry (panel title -> {bar label: value}); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (label, bars) in zip(axes[0], panels.items(), strict=True):
        ax.bar(list(bars), list(bars.values()), color=plt.cm.tab10.colors[:len(bars)])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
