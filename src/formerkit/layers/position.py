"""Position schemes: sinusoidal tables, rotary embeddings (RoPE) and ALiBi biases.

Learned absolute positions are a plain ``nn.Embedding`` owned by the model; "none" (NoPE)
adds nothing. Every function here is a closed form of the positions it is given.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s table: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same).

    positions: (B, T) integer positions. Returns (B, T, dim) float32.
    """
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )  # (dim/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, dim/2)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (B, T, dim/2, 2)
    return table.flatten(-2)  # (B, T, dim): sin, cos interleaved


class Rotary(nn.Module):
    """Rotary position embedding (Su et al.) in the "rotate half" layout used by Llama.

    Only the first ``rotary_dim`` dims of each head are rotated (partial rotary).
    """

    def __init__(self, rotary_dim: int, theta: float) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (rotary_dim/2,)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin), each (B, T, 1, rotary_dim) float32, for positions (B, T)."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)  # (B, T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, R)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, T, H, D) by the given angles; keep the rest."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (x_rot.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.): a geometric sequence 2^(-8/n), 2^(-16/n), ...

    For head counts that are not a power of two, the slopes of the nearest lower power of
    two are followed by every other slope of the next power, as in the paper's code.
    Returns (n_heads,) float32.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    lower = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(lower)
    if lower != n_heads:
        slopes += power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """ALiBi attention bias -slope * |i - j| for query positions i and key positions j.

    slopes: (H,); q_pos: (B, Tq); k_pos: (B, Tk). Returns (B, H, Tq, Tk) float32.
    """
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()  # (B, Tq, Tk)
    return -slopes.to(distance.device)[None, :, None, None] * distance[:, None]
