"""Turning next-token logits into a choice: penalties, temperature, top-k, top-p, min-p, sampling.

Every function takes logits (B, V) and returns logits (B, V) with excluded tokens at -inf,
so they compose in any order; ``choose`` then picks greedily or samples.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from formerkit.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 means greedy; the filters apply when sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name, integer, optional in [("temperature", False, False), ("top_k", True, True), ("top_p", False, True),
                                        ("min_p", False, True), ("repetition_penalty", False, False)]:
            _check_number(name, getattr(self, name), integer=integer, optional=optional)
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1: none), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax."""
        return self.temperature == 0


def _check_number(name: str, value: object, *, integer: bool, optional: bool) -> None:
    """Raise InputError unless ``value`` is a finite number (an integer if ``integer``; also None if ``optional``)."""
    if value is None and optional:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        what = "an integer" if integer else "a finite number"
        raise InputError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive (multiply negative) logits of already seen tokens by ``penalty``.

    seen: (B, V) bool, the tokens present in each row so far.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row."""
    if k >= logits.shape[-1]:
        return logits
    cutoff = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the most likely token's."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))


def process(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the repetition penalty, temperature and filters of ``cfg`` to logits (B, V) (float32)."""
    logits = logits.float()
    if seen is not None:
        logits = repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def choose(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row from processed logits (B, V): argmax, or a sample. Returns (B,)."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
