"""Position schemes: sinusoidal tables, rotary embeddings (RoPE), ALiBi and T5's relative biases.

Learned absolute positions are a plain ``nn.Embedding`` owned by the model; "none" (NoPE)
adds nothing. Every function here is a closed form of the positions it is given;
``RelativePositionBias`` looks up learned per-head values for closed-form buckets.
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

    Only the first ``rotary_dim`` dims of each head are rotated (partial rotary). cos and sin
    are computed in float32 once per device into a table indexed by position, grown (to the
    next power of two) when a call needs a longer one. The table is a plain attribute, not a
    buffer, so ``model.to(torch.bfloat16)`` cannot round it.
    """

    def __init__(self, rotary_dim: int, theta: float) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))  # (R/2,)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """The angles (..., R) of float32 positions (...): each frequency twice (rotate-half layout)."""
        freqs = positions[..., None] * self.inv_freq.to(positions.device)  # (..., R/2)
        return torch.cat((freqs, freqs), dim=-1)

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (n, rotary_dim) float32 with n >= length rows, for positions 0 .. n - 1 on ``device``."""
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            angles = self._angles(torch.arange(1 << max(length - 1, 1).bit_length(), device=device,
                                               dtype=torch.float32))  # (n, R)
            cached = self._tables[device] = (angles.cos(), angles.sin())
        return cached

    def forward(self, positions: torch.Tensor, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin), each (B, T, 1, rotary_dim) float32, for positions (B, T).

        ``bound``: a number every position is known to be below (no device read needed); the
        values are then looked up in the table. None: computed from the positions directly.
        """
        if bound is None:
            emb = self._angles(positions.float())[:, :, None, :]  # (B, T, 1, R)
            return emb.cos(), emb.sin()
        cos, sin = self.table(bound, positions.device)
        return cos[positions][:, :, None, :], sin[positions][:, :, None, :]  # (B, T, 1, R)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, T, H, D) by the given angles, in float32; keep the rest."""
    rot = cos.shape[-1]
    whole = rot == x.shape[-1]
    x32 = (x if whole else x[..., :rot]).float()  # (B, T, H, rot)
    x1, x2 = x32.chunk(2, dim=-1)
    out = torch.addcmul(x32 * cos, torch.cat((-x2, x1), dim=-1), sin).to(x.dtype)  # x cos + rotate_half(x) sin
    return out if whole else torch.cat((out, x[..., rot:]), dim=-1)


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


def relative_bucket(offset: torch.Tensor, *, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset (Raffel et al., from Mesh TensorFlow).

    Bidirectional: half of the buckets for keys before the query, half for keys after it;
    causal: all buckets for keys at or before it (later keys fall into bucket 0). Within a
    direction, the first half of the buckets holds the distances 0, 1, ... exactly and the
    other half logarithmically wider ranges up to max_distance; farther keys share the last.
    offset: integer tensor of k_pos - q_pos. Returns a long tensor of the same shape in [0, n_buckets).
    """
    n = n_buckets // 2 if bidirectional else n_buckets
    if bidirectional:
        base = (offset > 0).long() * n  # keys after the query use the upper half
        distance = offset.abs()
    else:
        base = torch.zeros_like(offset, dtype=torch.long)
        distance = (-offset).clamp(min=0)
    exact = n // 2
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)
    return base + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: one scalar per (bucket, head), added to attention scores.

    ``weight`` is (n_buckets, n_heads). Every layer of a stack shares the bias of the stack.
    """

    def __init__(self, n_buckets: int, max_distance: int, n_heads: int, *, bidirectional: bool) -> None:
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_heads))

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The bias for query positions q_pos (B, Tq) and key positions k_pos (B, Tk): (B, H, Tq, Tk)."""
        offset = k_pos[:, None, :] - q_pos[:, :, None]  # (B, Tq, Tk)
        buckets = relative_bucket(offset, bidirectional=self.bidirectional, n_buckets=self.n_buckets,
                                  max_distance=self.max_distance)
        return self.weight[buckets].permute(0, 3, 1, 2)  # (B, Tq, Tk, H) -> (B, H, Tq, Tk)
