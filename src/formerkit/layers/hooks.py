"""HookPoint: a named identity module where users can read or rewrite activations."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HookPoint(nn.Module):
    """Identity module placed at every interesting activation.

    Register ordinary PyTorch forward hooks on it (``hp.register_forward_hook``) to read or
    replace the activation. With no hook registered, calling it returns its input without
    entering ``nn.Module.__call__``, so unused hook points cost one attribute check.
    """

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (self._forward_hooks or self._forward_pre_hooks):
            return x
        return super().__call__(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` unchanged (hooks may replace it)."""
        return x

    @property
    def active(self) -> bool:
        """Whether any hook is registered on this point."""
        return bool(self._forward_hooks or self._forward_pre_hooks)
