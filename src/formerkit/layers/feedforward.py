"""Position-wise feed-forward networks: plain MLP and gated variants (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.layers.hooks import HookPoint
from formerkit.layers.linear import Linear

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """``fc_out(act(fc_in(x)))``, or with ``gated``: ``fc_out(act(fc_gate(x)) * fc_in(x))``.

    ``hook_pre`` sees the pre-activation (of the gate, when gated), ``hook_pre_linear`` the
    ungated branch, and ``hook_post`` the input of ``fc_out``.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str, gated: bool, bias: bool) -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.fc_in = Linear(d_model, d_ff, bias=bias)
        self.fc_gate = Linear(d_model, d_ff, bias=bias) if gated else None
        self.fc_out = Linear(d_ff, d_model, bias=bias)
        self.hook_pre, self.hook_pre_linear, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x (B, T, d_model) through the hidden layer (B, T, d_ff) back to (B, T, d_model)."""
        if self.fc_gate is None:
            hidden = self.act(self.hook_pre(self.fc_in(x)))
        else:
            gate = self.act(self.hook_pre(self.fc_gate(x)))
            hidden = gate * self.hook_pre_linear(self.fc_in(x))
        return self.fc_out(self.hook_post(hidden))
