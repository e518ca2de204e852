"""Normalization layers: LayerNorm (bias optional) and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.layers.hooks import HookPoint


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, with an optional bias; ``hook_normalized`` sees the output.

    ``hook_scale`` sees the per-position divisor sqrt(var + eps), shape (..., 1), as
    TransformerLens' ``hook_scale`` does; only a hook there leaves the fused kernel.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` (..., dim) to zero mean, unit variance, then scale and shift."""
        if not self.hook_scale.active:
            return self.hook_normalized(F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps))
        x32 = x.float()
        centered = x32 - x32.mean(-1, keepdim=True)
        scale = self.hook_scale((centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())  # (..., 1)
        out = (centered / scale).to(x.dtype) * self.weight
        return self.hook_normalized(out + self.bias if self.bias is not None else out)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich), computed in float32 as Llama and T5 do.

    ``hook_scale`` sees the per-position divisor sqrt(mean(x**2) + eps), shape (..., 1).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale ``x`` (..., dim) by the reciprocal RMS of its last dim, then by ``weight``."""
        x32 = x.float()
        if self.hook_scale.active:
            normed = x32 / self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        else:
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.hook_normalized(self.weight * normed.to(x.dtype))


def build_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """Return the norm layer named by ``kind`` ('layernorm' or 'rmsnorm')."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return LayerNorm(dim, eps, bias)
