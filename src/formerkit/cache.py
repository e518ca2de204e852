"""The KV cache: preallocated keys and values per attention layer, as modules with buffers.

``KVCache.for_model(model, batch_size, max_len)`` allocates, for every self-attention layer,
(B, n_kv_heads, max_len, d_head) key and value buffers, plus the positions of the cached
tokens (for ALiBi). A forward pass with ``cache=`` writes its new keys and values at
``cache.length`` and attends over everything cached so far; the model then advances
``length``. Prefill is a call with the whole prompt, decoding a call per new token.
Encoder-decoder models also keep the encoder output and each layer's cross-attention keys
and values, computed once at prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from formerkit.errors import InputError


class LayerKV(nn.Module):
    """Keys and values of one self-attention layer: buffers (B, KV, max_len, D)."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, d_head: int, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, d_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at ``start``; return all cached keys and values (B, KV, start + T, D)."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CrossKV:
    """Cross-attention keys and values of one decoder layer, computed from the encoder output once."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None


class KVCache(nn.Module):
    """A static KV cache for one model and one batch (see the module docstring)."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, d_head: int, *,
                 cross: bool, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = nn.ModuleList(LayerKV(batch_size, max_len, n_kv_heads, d_head, dtype, device)
                                    for _ in range(n_layers))
        self.cross = [CrossKV() for _ in range(n_layers)] if cross else None
        self.register_buffer("positions", torch.zeros(batch_size, max_len, dtype=torch.long, device=device),
                             persistent=False)
        self.length = 0
        self.memory: torch.Tensor | None = None  # encoder output (B, S, d_model), encoder-decoder only
        self.memory_mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """Allocate a cache for ``model`` (its decoder, for encoder-decoder models).

        max_len defaults to the model's max_seq_len; dtype and device follow the model's weights.
        """
        cfg = model.config
        if cfg.kind == "encoder":
            raise InputError("an encoder-only model attends to the whole sequence at once; it has no KV cache")
        weight = next(model.parameters())
        n_layers = cfg.decoder_layers if cfg.kind == "encoder-decoder" else cfg.n_layers
        return cls(n_layers, batch_size, max_len or cfg.max_seq_len, cfg.kv_heads, cfg.head_dim,
                   cross=cfg.kind == "encoder-decoder", dtype=dtype or weight.dtype, device=weight.device)

    def reserve(self, batch_size: int, new_tokens: int) -> int:
        """Check that ``new_tokens`` more fit for a batch of ``batch_size``; return the current length."""
        if batch_size != self.batch_size:
            raise InputError(f"the cache holds a batch of {self.batch_size}, got {batch_size}")
        if self.length + new_tokens > self.max_len:
            raise InputError(f"the KV cache holds {self.max_len} tokens; {self.length} are used and {new_tokens} "
                             "more do not fit; allocate a larger cache (max_len) or shorten the input")
        return self.length

    def record_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Store the positions (B, T) of the tokens being added; return those of all cached keys (B, L)."""
        end = self.length + positions.shape[1]
        self.positions[:, self.length:end] = positions
        return self.positions[:, :end]

    def reset(self) -> None:
        """Forget the cached sequence (buffers are reused)."""
        self.length = 0
        self.memory = self.memory_mask = None
        if self.cross is not None:
            self.cross = [CrossKV() for _ in self.cross]

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch rows by ``index`` (B,), as beam search does when beams are reselected."""
        filled = slice(0, self.length)
        for layer in self.layers:
            layer.k[:, :, filled] = layer.k[:, :, filled].index_select(0, index)
            layer.v[:, :, filled] = layer.v[:, :, filled].index_select(0, index)
        self.positions[:, filled] = self.positions[:, filled].index_select(0, index)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)
            if self.memory_mask is not None:
                self.memory_mask = self.memory_mask.index_select(0, index)
        for cross in self.cross or []:
            if cross.k is not None:
                cross.k, cross.v = cross.k.index_select(0, index), cross.v.index_select(0, index)
