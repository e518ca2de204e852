"""The KV cache: static key/value buffers per attention layer, written at device-side slot indices.

``KVCache.for_model(model, batch_size, max_len)`` allocates, for every self-attention layer,
(B, n_kv_heads, max_len, d_head) key and value buffers, plus per slot the position of the
cached token (for ALiBi and T5's relative bias) and whether it is a real token or padding.
A forward pass with ``cache=`` claims the next slots (``claim``), writes its keys and values
there with ``index_copy_`` and, once the cache holds earlier tokens, attends over a fixed
window of the buffer under a mask (slots after the query are masked): on an accelerator the
WHOLE buffer, so every decoding step has the same tensor shapes; on the CPU the written
slots rounded up to ``CPU_WINDOW_STEP`` (shapes change once per 64 tokens), since reading
the unwritten rest would cost a CPU memory bandwidth it has little of. The next free slot is
kept twice: ``cursor``, a scalar tensor on the cache's device that the writes index with,
and ``length``, its host copy, which bounds checks and the window read without waiting for
the device. Prefill is a call with the whole prompt, decoding a call per
new token. Encoder-decoder models also keep the encoder output and each layer's
cross-attention keys and values, computed once at prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from formerkit.errors import InputError

CPU_WINDOW_STEP = 16  # on the CPU, attention reads the cache in windows of this many slots


class _Write:
    """Where the current forward pass writes, the claimed slots (T,), and how many slots it attends over.

    ``width`` 0: the new keys only (the cache was empty). One instance is shared by a cache and
    all its layers; ``KVCache.claim`` sets it before each pass.
    """

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.width = 0


class LayerKV(nn.Module):
    """Keys and values of one self-attention layer: buffers (B, KV, max_len, D)."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, d_head: int, dtype: torch.dtype,
                 device: torch.device | None, write: _Write) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, d_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._write = write

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at the claimed slots; return the keys and values to attend to.

        Those are the first ``width`` slots of the buffers (B, KV, width, D) once the cache held
        tokens before this pass (the caller masks the slots that are not keys of a query), else
        k and v themselves.
        """
        slots = self._write.slots
        if k.dtype != self.k.dtype:  # autocast: the buffers keep the weights' dtype
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        width = self._write.width
        if not width:
            return k, v
        return (self.k, self.v) if width == self.k.shape[2] else (self.k[:, :, :width], self.v[:, :, :width])

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch rows by ``index`` (B,)."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class LinearKV(nn.Module):
    """The running state of one linear-attention layer: sums of ``phi(k) v^T`` (B, H, D, D) and ``phi(k)`` (B, H, D)
    over the tokens seen so far; its size does not grow with their number."""

    def __init__(self, batch_size: int, n_heads: int, d_head: int, dtype: torch.dtype,
                 device: torch.device | None, write: _Write) -> None:
        super().__init__()
        self.register_buffer("kv_sum", torch.zeros(batch_size, n_heads, d_head, d_head, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("k_sum", torch.zeros(batch_size, n_heads, d_head, dtype=dtype, device=device),
                             persistent=False)
        self._write = write

    @property
    def attends_window(self) -> bool:
        """Whether this pass's mask spans the cache window (the new tokens' columns are ``slots``)."""
        return self._write.width > 0

    @property
    def slots(self) -> torch.Tensor:
        """The slots (T,) of this pass's tokens."""
        return self._write.slots

    def store(self, kv_sum: torch.Tensor, k_sum: torch.Tensor) -> None:
        """Replace the state by the sums after this pass's tokens (kept in the buffers' dtype)."""
        self.kv_sum, self.k_sum = kv_sum.to(self.kv_sum.dtype), k_sum.to(self.k_sum.dtype)

    def clear(self) -> None:
        """Forget every token (a zero state)."""
        self.kv_sum.zero_()
        self.k_sum.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch rows by ``index`` (B,)."""
        self.kv_sum, self.k_sum = self.kv_sum.index_select(0, index), self.k_sum.index_select(0, index)


class CrossKV:
    """Cross-attention keys and values of one decoder layer, computed from the encoder output once."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None


class KVCache(nn.Module):
    """A static KV cache for one model and one batch (see the module docstring).

    ``n_kv_heads``: one count for every layer, or a list of one per layer (a pruned model).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int | list[int], d_head: int, *,
                 cross: bool, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 window_step: int | None = None, linear_heads: int | list[int] | None = None) -> None:
        super().__init__()
        self.batch_size, self.max_len = batch_size, max_len
        self.window_step = window_step  # None: attend over the whole buffer
        self._write = _Write()
        heads = n_kv_heads if isinstance(n_kv_heads, list) else [n_kv_heads] * n_layers  # per layer (pruned models)
        self.linear = linear_heads is not None  # linear attention: a running state per layer, not keys and values
        if self.linear:  # one query-head count per layer (a pruned model's differ)
            counts = linear_heads if isinstance(linear_heads, list) else [linear_heads] * n_layers
            self.layers = nn.ModuleList(LinearKV(batch_size, h, d_head, dtype, device, self._write) for h in counts)
        else:
            self.layers = nn.ModuleList(LayerKV(batch_size, max_len, kv, d_head, dtype, device, self._write)
                                        for kv in heads)
        self.cross = [CrossKV() for _ in range(n_layers)] if cross else None
        self.register_buffer("positions", torch.zeros(batch_size, max_len, dtype=torch.long, device=device),
                             persistent=False)  # (B, L) the position of the token in each slot
        self.register_buffer("key_mask", torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)  # (B, L) True where the slot holds a real token, not padding
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer("_offsets", torch.arange(max_len, device=device), persistent=False)  # (L,)
        self.length = 0  # host copy of ``cursor``
        self.position_bound = max_len  # every position fed to the cache is below it (RoPE reads its table to it)
        self.padded = False  # whether a padding mask was ever recorded (else every cached key is a real token)
        self.memory: torch.Tensor | None = None  # encoder output (B, S, d_model), encoder-decoder only
        self.memory_mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """Allocate a cache for ``model`` (its decoder, with the decoder's sizes, for encoder-decoder models).

        max_len defaults to the model's max_seq_len; dtype and device follow the model's weights.
        Attention reads the whole buffer on an accelerator, windows of ``CPU_WINDOW_STEP`` slots on the CPU.
        """
        cfg = model.config
        if cfg.kind == "encoder":
            raise InputError("an encoder-only model attends to the whole sequence at once; it has no KV cache")
        weight = next(model.parameters())
        n_layers = cfg.decoder_layers if cfg.kind == "encoder-decoder" else cfg.n_layers
        sizes = cfg.decoder_config()  # the decoder's heads (an encoder-decoder's may differ from its encoder's)
        return cls(n_layers, batch_size, max_len or cfg.max_seq_len, sizes.kv_heads, sizes.head_dim,
                   cross=cfg.kind == "encoder-decoder", dtype=dtype or weight.dtype, device=weight.device,
                   window_step=CPU_WINDOW_STEP if weight.device.type == "cpu" else None,
                   linear_heads=sizes.n_heads if cfg.attn_type == "linear" else None)

    def claim(self, batch_size: int, new_tokens: int) -> torch.Tensor:
        """Choose the slots (new_tokens,) of the next ``new_tokens`` tokens, for every layer of this pass.

        Checks (on the host) that they fit and that the batch size matches; the slots come
        from ``cursor`` on the device. ``advance`` moves past them after the pass.
        """
        if batch_size != self.batch_size:
            raise InputError(f"the cache holds a batch of {self.batch_size}, got {batch_size}")
        if self.length + new_tokens > self.max_len:
            raise InputError(f"the KV cache holds {self.max_len} tokens; {self.length} are used and {new_tokens} "
                             "more do not fit; allocate a larger cache (max_len) or shorten the input")
        self._write.slots = self.cursor + self._offsets[:new_tokens]  # (T,)
        self._write.width = self._window(self.length + new_tokens) if self.length else 0
        return self._write.slots

    @property
    def width(self) -> int:
        """How many slots the current pass attends over (0: only its own new tokens)."""
        return self._write.width

    def _window(self, end: int) -> int:
        """The slots attention reads when the cache holds ``end`` tokens: all, or ``end`` rounded up to window_step."""
        if self.window_step is None:
            return self.max_len
        return min(self.max_len, -(-end // self.window_step) * self.window_step)

    def record(self, slots: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Store the positions (B, T) of the tokens in ``slots`` (T,) and their padding mask (B, T) (None: all real)."""
        self.positions.index_copy_(1, slots, positions.long())
        if mask is None:
            self.key_mask.index_fill_(1, slots, True)
        else:
            self.key_mask.index_copy_(1, slots, mask.bool())
            self.padded = True

    def advance(self, new_tokens: int) -> None:
        """Move the next free slot ``new_tokens`` further (after a pass that wrote them)."""
        self.cursor += new_tokens
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached tokens and forget the rest (later writes overwrite them)."""
        if not 0 <= length <= self.length:
            raise InputError(f"truncate keeps between 0 and {self.length} cached tokens, got {length}")
        if self.linear and 0 < length < self.length:
            raise InputError("linear attention sums its tokens into one running state, which cannot drop the last "
                             "ones; decoding that rewinds the cache (speculative, Jacobi) needs softmax attention")
        if self.linear and length == 0:
            for layer in self.layers:
                layer.clear()
        self.cursor.fill_(length)
        self.length = length

    def compact(self, keep: torch.Tensor | list[torch.Tensor]) -> None:
        """Keep only the cached tokens at slots ``keep`` (B, n), moved to slots 0 .. n - 1 in that order.

        ``keep``: one index for every layer, or a list of one per layer (each (B, n), the same n);
        positions and the padding mask follow the first layer's index. The cache then holds n tokens.
        """
        per_layer = keep if isinstance(keep, list) else [keep] * len(self.layers)
        n = per_layer[0].shape[1]
        for layer, index in zip(self.layers, per_layer, strict=True):
            B, KV, _, D = layer.k.shape
            full = index[:, None, :, None].expand(B, KV, n, D)  # (B, KV, n, D)
            layer.k[:, :, :n] = layer.k.gather(2, full)
            layer.v[:, :, :n] = layer.v.gather(2, full)
        self.positions[:, :n] = self.positions.gather(1, per_layer[0])
        self.key_mask[:, :n] = self.key_mask.gather(1, per_layer[0])
        self.truncate(n)

    def reset(self) -> None:
        """Forget the cached sequence (buffers are reused)."""
        self.truncate(0)
        self.padded = False
        self.memory = self.memory_mask = None
        if self.cross is not None:
            self.cross = [CrossKV() for _ in self.cross]

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch rows by ``index`` (B,), as beam search does when beams are reselected."""
        for layer in self.layers:
            layer.reorder(index)
        self.positions, self.key_mask = self.positions.index_select(0, index), self.key_mask.index_select(0, index)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)
            if self.memory_mask is not None:
                self.memory_mask = self.memory_mask.index_select(0, index)
        for cross in self.cross or []:
            if cross.k is not None:
                cross.k, cross.v = cross.k.index_select(0, index), cross.v.index_select(0, index)
