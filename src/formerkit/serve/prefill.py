"""Batched prefill for the engine: the prompts admitted in one step, grouped and run as left-padded batches.

Every request admitted in a step needs its prompt run through the model once. Running them
one at a time costs a forward pass (and a read of every weight) per prompt; running them as
one left-padded batch costs one pass, but pays for the padding. ``prefill_groups`` splits
the admitted prompts into batches that waste little: longest first, a prompt joins the
current batch while the batch's real tokens stay at least ``PREFILL_FILL`` of its padded
slots and the padded batch stays within ``PREFILL_TOKENS``. ``prefill_batch`` runs one such
batch exactly as ``fk.generate`` prefills a left-padded batch: padding masked as keys,
positions counting each row's real tokens only, so a row's keys, values and next-token
logits are those of its prompt prefilled alone (up to the float rounding of the batched
matrix products).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from formerkit.cache import KVCache
from formerkit.generate.steps import prefill

PREFILL_TOKENS = 4096  # most padded prompt tokens in one prefill pass
PREFILL_FILL = 0.75  # a batch's real tokens are at least this fraction of its padded slots


def prefill_groups(lengths: Sequence[int], budget: int = PREFILL_TOKENS, fill: float = PREFILL_FILL) -> list[list[int]]:
    """Split prompts of ``lengths`` into prefill batches; return the batches as lists of indices into ``lengths``.

    Longest first: a prompt joins the current batch when the batch, padded to its longest
    prompt, keeps at least ``fill`` of its slots real and at most ``budget`` slots; else it
    starts the next batch. A prompt longer than ``budget`` is a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            longest = lengths[groups[-1][0]]
            slots = (len(groups[-1]) + 1) * longest
            if slots <= budget and real + lengths[i] >= fill * slots:
                groups[-1].append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def prefill_batch(model: nn.Module, prompts: Sequence[Sequence[int]], pad: int) -> tuple[KVCache, torch.Tensor]:
    """Prefill ``prompts`` as one left-padded batch in a fresh cache; return (the cache, next-token logits (B, V)).

    Row b of the cache holds prompt b's tokens in its last ``len(prompts[b])`` written slots
    (``slots.insert_row`` copies them from there); ``pad`` fills the padding (masked, never attended).
    """
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=device)  # (B, T)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)  # (B, T), 1: a real token
    for b, prompt in enumerate(prompts):
        ids[b, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
        mask[b, longest - len(prompt):] = 1
    cache = KVCache.for_model(model, len(prompts), longest)
    logits = prefill(model, ids, None if bool(mask.all()) else mask, cache)  # (B, V)
    return cache, logits
