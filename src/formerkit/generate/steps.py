"""The per-call primitives of decoding with a static KV cache: prefill, one decoding step, eval mode.

``prefill`` is a checked forward pass over the whole prompt (once per call); ``decode_step``
feeds one token per row through ``Transformer.decode``, which checks nothing and reads nothing
back from the device, with the same tensor shapes at every step. ``generate``/``stream``
(``decode.py``) and ``beam_search`` (``beam.py``) are loops over these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from formerkit.cache import KVCache

SYNC_EVERY = 8  # decoding steps between reads of "has every row stopped?" on an accelerator


def prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache, *,
            decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run the whole prompt through ``model``, filling ``cache``; return the next-token logits (B, V).

    Decoder-only: input_ids (B, T) is the prompt, attention_mask (B, T) marks left padding
    (None: no padding); positions count real tokens only. Encoder-decoder: input_ids is the
    source, encoded once into the cache, and decoder_input_ids (B, 1) starts the target.
    This is a checked forward pass (once per call).
    """
    if decoder_input_ids is not None:
        return model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, cache=cache).logits[:, -1]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) if attention_mask is not None else None  # (B, T)
    return model(input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache).logits[:, -1]


def decode_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one new token per row, tokens (B,) at positions (B,), after the cached ones; return logits (B, V).

    No checks and no reads from the device (``Transformer.decode``): the tensors keep their
    shapes from step to step. The inputs must continue a cache that ``prefill`` filled.
    """
    return model.decode(tokens[:, None], positions[:, None], cache)[:, -1]


def start_decoding(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, decoder_start: int,
                   new_tokens: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Allocate a cache for ``ids`` (B, T) and ``new_tokens`` >= 1 more, and prefill it.

    Returns (cache, the next-token logits (B, V), the positions (B,) of the next tokens).
    Decoder-only: ids is the left-padded prompt; encoder-decoder: the source, decoded from
    ``decoder_start``. The last new token is never fed, so the cache holds one fewer.
    """
    B = ids.shape[0]
    if model.config.kind == "encoder-decoder":
        cache = KVCache.for_model(model, B, new_tokens)  # the start token + new tokens - the last
        start = torch.full((B, 1), decoder_start, dtype=torch.long, device=ids.device)  # (B, 1)
        logits = prefill(model, ids, mask, cache, decoder_input_ids=start)
        return cache, logits, torch.ones(B, dtype=torch.long, device=ids.device)
    cache = KVCache.for_model(model, B, ids.shape[1] + new_tokens - 1)
    logits = prefill(model, ids, None if bool(mask.all()) else mask, cache)
    return cache, logits, mask.sum(-1)  # (B,): the next position of each row counts its real tokens


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the model's training flag is restored afterwards."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def sync_interval(device: torch.device) -> int:
    """Steps between reads of "has every row stopped?": every step on the CPU, ``SYNC_EVERY`` on accelerators."""
    return 1 if device.type == "cpu" else SYNC_EVERY
