"""Attention masks: causal, padding, sliding window, ALiBi and learned biases folded into one additive bias."""

from __future__ import annotations

import torch

from formerkit.layers.position import alibi_bias


def attention_bias(
    *,
    dtype: torch.dtype,
    q_len: int,
    k_len: int,
    causal: bool,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    alibi: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    position_bias: torch.Tensor | None = None,
    device: torch.device | None = None,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Build the additive attention bias for one stack, or None when a plain causal flag will do.

    The bias is always built for queries at given slots (``query_index``), where the causal
    flag, which assumes the queries are the last keys, would be wrong.

    key_mask: (B, Tk) with 1 for real tokens and 0 for padding. alibi: (slopes, q_pos, k_pos).
    position_bias: a learned bias (B, H, Tq, Tk) added to the scores (T5's relative positions).
    sliding_window: a causal query sees the last ``sliding_window`` keys (itself included); a
    bidirectional one sees keys less than ``sliding_window`` positions away on either side.
    Query i sits at index k_len - q_len + i among the keys (queries are the last tokens), or at
    ``query_index[i]`` when given (Tq,): the slots of a static KV cache, whose later slots the
    causal mask hides.
    Masked entries get the dtype's most negative finite value, so a row with nothing to
    attend to yields a uniform (finite) distribution instead of NaN.
    Returns (B or 1, H or 1, Tq, Tk) in ``dtype``, or None.
    """
    if query_index is None and key_mask is None and sliding_window is None and alibi is None and position_bias is None:
        return None
    if query_index is None:
        query_index = torch.arange(k_len - q_len, k_len, device=device)
    q_idx = query_index[:, None]  # (Tq, 1)
    k_idx = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    allowed = k_idx <= q_idx if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)  # (Tq, Tk)
    if sliding_window is not None:  # causal: look back only; bidirectional: a band around i
        distance = q_idx - k_idx if causal else (q_idx - k_idx).abs()
        allowed &= distance < sliding_window
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_mask is not None:
        key_mask = key_mask if key_mask.dtype == torch.bool else key_mask.bool()
        allowed = allowed & key_mask[:, None, None, :]  # (B, 1, Tq, Tk)
    if alibi is None and position_bias is None:
        bias = torch.where(allowed, 0.0, torch.finfo(dtype).min)  # (B or 1, 1, Tq, Tk) float32
        return bias if bias.dtype == dtype else bias.to(dtype)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    if alibi is not None:
        bias = bias + alibi_bias(*alibi).to(dtype)  # (B, H, Tq, Tk)
    if position_bias is not None:
        bias = bias + position_bias.to(dtype)  # (B, H, Tq, Tk)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)
