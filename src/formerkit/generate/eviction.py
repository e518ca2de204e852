"""Running a ``CachePolicy``: a bounded static cache, the attention its policy reads, eviction after each pass.

An ``Evictor`` serves one generation call. ``new_cache`` allocates max(prompt, budget) slots
(fewer when the whole call fits); ``watch`` registers, for the duration of a forward pass, the
hooks on each layer's ``hook_pattern`` that H2O and TOVA read; ``after_pass`` brings the cache
back to budget - 1 tokens (``KVCache.compact``: the kept keys, values, positions and padding
mask moved to the front, in order, so the causal mask by slot still holds) and returns the
positions of the next tokens.

Which tokens stay: padding first goes (in every layer alike, so the one padding mask stays
true), then each policy ranks the real tokens (sliding and sinks by recency, with the sinks
protected; H2O by accumulated attention, with the recent window protected; TOVA by the current
query's attention) and keeps the top budget - 1. Sinks re-indexes positions for RoPE (a kept
key moved from position p to p - d is rotated by -d: R(p - d) = R(-d) R(p)) and for ALiBi and
relative biases (the cache's stored positions, which the bias reads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from formerkit.cache import KVCache
from formerkit.errors import InputError
from formerkit.generate.cache_policy import REINDEXED_POSITIONS, CachePolicy, check_policy
from formerkit.generate.steps import inference
from formerkit.inputs import check_ids
from formerkit.layers.position import apply_rotary


class Evictor:
    """The eviction state of one generation call under ``policy`` (see the module docstring)."""

    def __init__(self, model: nn.Module, policy: CachePolicy) -> None:
        check_policy(policy, model.config)
        self.policy = policy
        self.attention = [block.attn for block in model.blocks]
        self.reindex = policy.kind == "sinks" and model.config.position in REINDEXED_POSITIONS
        self.rotary = model.rotary if self.reindex else None
        self.seen: list[torch.Tensor] = []  # per layer (B, S): what the last pass's attention says of each slot
        self.received: list[torch.Tensor] | None = None  # H2O: per layer (B, slots) attention received so far

    def new_cache(self, model: nn.Module, batch_size: int, prompt: int, new_tokens: int) -> KVCache:
        """A cache for a prompt of ``prompt`` columns and ``new_tokens`` >= 1 more (the last never fed).

        It holds max(prompt, budget) slots, or prompt + new_tokens - 1 when that is fewer;
        positions may run to prompt + new_tokens.
        """
        slots = prompt + new_tokens - 1
        if self.policy.evicts:
            slots = min(slots, max(prompt, self.policy.budget))
        cache = KVCache.for_model(model, batch_size, slots)
        cache.position_bound = max(slots, prompt + new_tokens)
        if self.policy.kind == "h2o":
            weight = cache.layers[0].k
            self.received = [torch.zeros(batch_size, slots, device=weight.device) for _ in self.attention]
        return cache

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Record each layer's attention of this forward pass into ``seen`` (H2O, TOVA; else nothing)."""
        if not self.policy.per_layer:
            yield
            return
        self.seen = [torch.empty(0)] * len(self.attention)
        tova = self.policy.kind == "tova"

        def recorder(i: int):
            def record(_module: nn.Module, _inputs: tuple, pattern: torch.Tensor) -> None:
                p = pattern.float()  # (B, H, T, S)
                self.seen[i] = p[:, :, -1].mean(1) if tova else p.sum((1, 2))  # (B, S)
            return record

        handles = [attn.hook_pattern.register_forward_hook(recorder(i)) for i, attn in enumerate(self.attention)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def after_pass(self, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """Evict down to budget - 1 tokens after a pass; return the next tokens' positions (B,).

        ``positions``: where the next tokens would sit without re-indexing.
        """
        if self.received is not None:
            for received, seen in zip(self.received, self.seen, strict=True):
                received[:, :seen.shape[1]] += seen
        if self.policy.evicts and cache.length > self.policy.budget - 1:
            self._evict(cache)
            if self.reindex:
                self._reindex(cache)
        if self.reindex:  # the next token sits after the real tokens the cache holds
            return cache.key_mask[:, :cache.length].sum(-1)  # (B,)
        return positions

    def _evict(self, cache: KVCache) -> None:
        """Keep budget - 1 tokens per row and layer (the module docstring says which), compacted to the front."""
        n, keep = cache.length, self.policy.budget - 1
        real = cache.key_mask[:, :n]  # (B, n)
        recency = torch.arange(n, device=real.device, dtype=torch.float32).expand_as(real)  # (B, n)
        kind = self.policy.kind
        if kind in ("sliding", "sinks"):
            sinks = (real.cumsum(-1) <= self.policy.sinks) if kind == "sinks" else None
            cache.compact(_top(recency, real, sinks, keep))
            return
        if kind == "h2o":
            recent = recency >= n - (self.policy.recent - 1)  # (B, n): the window beside the next token
            slots = [_top(received[:, :n], real, recent, keep) for received in self.received]
            for received, index in zip(self.received, slots, strict=True):
                kept = received.gather(1, index)
                received.zero_()
                received[:, :keep] = kept
        else:
            slots = [_top(seen[:, :n], real, None, keep) for seen in self.seen]
        cache.compact(slots)

    def _reindex(self, cache: KVCache) -> None:
        """Give the cached real tokens positions 0, 1, ... in cache order (RoPE keys rotated to match)."""
        n = cache.length
        real = cache.key_mask[:, :n]  # (B, n)
        old = cache.positions[:, :n]
        new = torch.where(real, real.cumsum(-1) - 1, old)  # (B, n)
        if self.rotary is not None:
            cos, sin = self.rotary(new - old)  # (B, n, 1, R): rotate each key by its shift
            for layer in cache.layers:
                k = layer.k[:, :, :n].transpose(1, 2)  # (B, n, KV, D)
                layer.k[:, :, :n] = apply_rotary(k, cos, sin).transpose(1, 2)
        cache.positions[:, :n] = new


def _top(score: torch.Tensor, real: torch.Tensor, protected: torch.Tensor | None, keep: int) -> torch.Tensor:
    """The slots (B, keep), ascending, of the ``keep`` best of score (B, n): protected first, padding last.

    Ties keep the earlier slot, so every layer keeps the same padding slots.
    """
    rank = score.masked_fill(~real, float("-inf"))
    if protected is not None:
        rank = rank.masked_fill(protected & real, float("inf"))
    best = rank.argsort(dim=1, descending=True, stable=True)[:, :keep]  # (B, keep)
    return best.sort(dim=1).values


def policy_logits(model: nn.Module, input_ids: torch.Tensor, policy: CachePolicy, *, prompt: int = 1) -> torch.Tensor:
    """Teacher-forced next-token logits (B, T, V) of input_ids (B, T) under ``policy``, as generation would see them.

    The first ``prompt`` tokens are prefilled at once, the rest fed one per step with eviction
    after every pass, so a held-out perplexity under the policy is the cross-entropy of
    logits[:, :-1] against input_ids[:, 1:]. No padding; decoder-only models.
    """
    check_ids("input_ids", input_ids, model.config)
    B, T = input_ids.shape
    if isinstance(prompt, bool) or not isinstance(prompt, int) or not 1 <= prompt <= T:
        raise InputError(f"prompt (the tokens prefilled at once) must be an integer in [1, {T}], got {prompt!r}")
    evictor = Evictor(model, policy)
    cache = evictor.new_cache(model, B, prompt, max(T - prompt + 1, 1))
    out = []
    with inference(model):
        with evictor.watch():
            out.append(model(input_ids[:, :prompt], cache=cache).logits)  # (B, prompt, V)
        positions = evictor.after_pass(cache, torch.full((B,), prompt, device=input_ids.device))
        for t in range(prompt, T):
            with evictor.watch():
                out.append(model.decode(input_ids[:, t:t + 1], positions[:, None], cache))  # (B, 1, V)
            positions = evictor.after_pass(cache, positions + 1)
    return torch.cat(out, dim=1)
