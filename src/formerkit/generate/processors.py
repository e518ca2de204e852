"""Turning next-token logits into a choice: penalties, temperature, top-k, top-p, min-p, sampling.

Every function takes logits (B, V) and returns logits (B, V) with excluded tokens at -inf,
so they compose in any order; ``choose`` then picks greedily or samples. The options come
from a ``GenerationConfig`` (validated there). Nothing here reads a value back from the
device, so a decoding step never waits for it.
"""

from __future__ import annotations

import torch

from formerkit.generate.config import GenerationConfig


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


def process(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
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


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of non-negative weights (N, V), drawn in proportion to them: (N,).

    The exponential race: argmax(w / E) with E ~ Exp(1) i.i.d. picks index i with probability
    w_i / sum(w). It is what ``torch.multinomial(probs, 1)`` computes (the same draws from the
    same generator), without the device reads that multinomial makes to check its input.
    """
    race = torch.empty_like(probs).exponential_(generator=generator)  # (N, V)
    return (probs / race).argmax(-1)


def choose(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row from processed logits (B, V): argmax, or a sample. Returns (B,)."""
    if cfg.greedy:
        return logits.argmax(-1)
    return sample(logits.softmax(-1), generator)
