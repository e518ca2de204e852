"""Putting checkpoint tensors into a model: tied-weight detection and a checked copy."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from formerkit.errors import CheckpointError


def tied_names(model: nn.Module) -> set[str]:
    """Names in ``model.state_dict()`` whose tensor aliases one listed earlier (tied weights)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` (formerkit names) into ``model``, or raise CheckpointError listing every mismatch."""
    own = model.state_dict()
    tied = tied_names(model)
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items) if label != 'wrong shapes' else '; '.join(items)}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", shapes))
                 if items]
        raise CheckpointError(f"weights in {source} do not match its config — " + " | ".join(parts))
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
