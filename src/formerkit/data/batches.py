"""Batches of token windows for causal language modeling.

``WindowBatches`` draws random windows whose positions depend only on (seed, step): the
data position of a run is its step number, so resuming is exact, and data-parallel ranks
take disjoint rows of the same global batch. ``eval_batches`` gives fixed windows spread
evenly over a split.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from formerkit.errors import ConfigError, DataError


def _check_int(name: str, value: object, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        raise ConfigError(f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return int(value)


def _check_tokens(tokens: np.ndarray, seq_len: int) -> None:
    if getattr(tokens, "ndim", None) != 1:
        raise DataError(f"tokens must be a 1-D array of token ids, got shape {getattr(tokens, 'shape', None)}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"the token split has {len(tokens):,} tokens, but seq_len={seq_len} needs at least "
                        f"{seq_len + 1:,} (a window plus its shifted target); use a shorter seq_len or more text")


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for (seed, step), well mixed so that nearby steps are unrelated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "big") >> 1


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (B, T) and targets y (B, T) = x shifted left by one, for windows starting at ``starts``."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts.tolist()])  # (B, T+1)
    window = torch.from_numpy(rows)  # (B, T+1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class WindowBatches:
    """Deterministic random windows of ``seq_len + 1`` tokens; ``batch(step)`` is a pure function of step.

    ``batch_size`` is the global batch; rank ``r`` of ``world_size`` takes rows
    ``r * B_local : (r + 1) * B_local`` of it, so ranks never overlap and together they give
    exactly the single-process batch.
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        self.seed = _check_int("seed", seed, None)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be below world_size={world_size}, got {rank}")
        if self.batch_size % self.world_size:
            raise ConfigError(f"batch_size={batch_size} (the global batch) must be divisible by "
                              f"world_size={world_size}")
        _check_tokens(tokens, self.seq_len)
        self.tokens = tokens
        self.local_batch_size = self.batch_size // self.world_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's inputs x (B_local, T) and targets y (B_local, T) for ``step`` (int64 ids)."""
        step = _check_int("step", step, 0)
        generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=generator)  # (B,)
        mine = starts[self.rank * self.local_batch_size : (self.rank + 1) * self.local_batch_size]  # (B_local,)
        return _windows(self.tokens, mine.numpy(), self.seq_len)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                 max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: up to ``max_batches`` batches of (x (B, T), y (B, T)).

    The windows are spread evenly from the start to the end of ``tokens`` (as many as fit
    without overlapping, at most ``batch_size * max_batches``); the last batch may be smaller.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    max_batches = _check_int("max_batches", max_batches, 1)
    _check_tokens(tokens, seq_len)
    count = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).round().astype(np.int64)  # (count,)
    return [_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, count, batch_size)]
