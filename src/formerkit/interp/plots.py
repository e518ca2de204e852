"""PNG heat maps (matplotlib, no display needed): attention patterns, logit-lens tables, patching results.

Each function returns the PNG's bytes and also writes them (atomically) when given a path.
Labels are drawn only where they stay legible; long inputs get a plain heat map.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from formerkit.errors import InputError
from formerkit.fileio import atomic_write

MAX_TICKS = 64  # more tick labels than this on an axis are left off
MAX_CELL_TEXT = 400  # cells annotated with their token, at most


def _png(fig: Figure, path: str | Path | None) -> bytes:
    """Render ``fig`` to PNG bytes, writing them to ``path`` too when given."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = buffer.getvalue()
    if path is not None:
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
    return data


def _ticks(ax, labels: Sequence[str] | None, axis: str) -> None:
    """Label an axis with ``labels`` when there are few enough to read."""
    if labels is None or len(labels) > MAX_TICKS:
        return
    positions = range(len(labels))
    if axis == "x":
        ax.set_xticks(positions, [str(s) for s in labels], rotation=90, fontsize=8)
    else:
        ax.set_yticks(positions, [str(s) for s in labels], fontsize=8)


def _size(rows: int, cols: int) -> tuple[float, float]:
    """Figure size in inches for a rows x cols grid: about a quarter inch a cell, within sane bounds."""
    return min(16.0, max(4.0, 0.25 * cols + 2)), min(16.0, max(3.0, 0.25 * rows + 1.5))


def attention_png(pattern: torch.Tensor, tokens: Sequence[str] | None = None, *,
                  key_tokens: Sequence[str] | None = None, title: str = "attention",
                  path: str | Path | None = None) -> bytes:
    """Draw one attention pattern (query, key), or the mean of (heads, query, key), as a heat map; returns PNG bytes."""
    if pattern.dim() == 3:
        pattern = pattern.float().mean(0)
    if pattern.dim() != 2:
        raise InputError(f"attention_png draws (query, key) or (heads, query, key); got {tuple(pattern.shape)}")
    T, S = pattern.shape
    keys = tokens if key_tokens is None else key_tokens
    for side, names, n in (("query", tokens, T), ("key", keys, S)):
        if names is not None and len(names) != n:
            raise InputError(f"{len(names)} {side} tokens for a pattern with {n} {side} positions")
    fig = Figure(figsize=_size(T, S))
    ax = fig.add_subplot()
    image = ax.imshow(pattern.detach().float().cpu().numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _ticks(ax, keys, "x")
    _ticks(ax, tokens, "y")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    return _png(fig, path)


def logit_lens_png(probs: torch.Tensor, top: Sequence[Sequence[str]], *, layer_labels: Sequence[str],
                   tokens: Sequence[str] | None = None, title: str = "logit lens",
                   path: str | Path | None = None) -> bytes:
    """Draw a logit-lens table: rows are layers, columns positions, the shade the top token's probability.

    probs: (layers, pos) probability of each cell's top token; ``top`` the token strings, same layout,
    written in the cells when there are few enough. Returns PNG bytes.
    """
    rows, cols = probs.shape
    if len(top) != rows or any(len(r) != cols for r in top) or len(layer_labels) != rows:
        raise InputError(f"the logit lens table is {rows} x {cols}; the top tokens and layer labels must match it")
    fig = Figure(figsize=_size(rows, cols * 2))
    ax = fig.add_subplot()
    image = ax.imshow(probs.detach().float().cpu().numpy(), cmap="Greens", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="probability of the top token")
    if rows * cols <= MAX_CELL_TEXT:
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, repr(top[r][c])[1:-1][:8], ha="center", va="center", fontsize=7,
                        color="white" if probs[r, c] > 0.6 else "black")
    _ticks(ax, tokens, "x")
    _ticks(ax, layer_labels, "y")
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("residual stream")
    ax.set_title(title)
    return _png(fig, path)


def patching_png(result: torch.Tensor, *, row_labels: Sequence[str] | None = None,
                 col_labels: Sequence[str] | None = None, title: str = "activation patching",
                 xlabel: str = "position", ylabel: str = "layer", path: str | Path | None = None) -> bytes:
    """Draw a patching result (rows, cols), e.g. ``get_act_patch_resid_pre``'s (layer, pos), centred on zero.

    Returns PNG bytes.
    """
    if result.dim() != 2:
        raise InputError(f"patching_png draws a (rows, cols) result; got {tuple(result.shape)}")
    values = result.detach().float().cpu()
    bound = max(values.abs().max().item(), 1e-12)
    fig = Figure(figsize=_size(*values.shape))
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _ticks(ax, col_labels, "x")
    _ticks(ax, row_labels, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(fig, path)
