"""Sentence embeddings: pooled, optionally normalized hidden states of any model.

Throughput comes from batching by tokens rather than by sentences: a chunk of texts is
tokenized in one call, sorted by token count, and cut into batches of about ``max_tokens``
tokens each, padded only to their own longest text. A batch whose texts all have one length
runs without an attention mask, and the model's LM head (unused here) is never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from formerkit.errors import InputError
from formerkit.heads import pool
from formerkit.model import Transformer, _run_stack
from formerkit.tokenizers import Tokenizer

MAX_TOKENS = 2048  # default tokens per batch, padding included (swept: embed_throughput.py --sweep; docs/embeddings.md)
CHUNK = 4096  # texts tokenized and sorted together; bounds the memory of the padded ids
MIN_FILL = 0.9  # a text shorter than this share of its batch's longest starts a new batch


def plan_batches(lengths: list[int], max_tokens: int, batch_size: int | None = None) -> list[list[int]]:
    """Group text indices into batches of similar token length.

    Indices are sorted by ``lengths`` (longest first) and cut so that each batch's size times
    its longest length stays within ``max_tokens`` (a single text longer than that gets a batch
    of its own), no text is shorter than ``MIN_FILL`` of its batch's longest (little padding),
    and, when ``batch_size`` is given, each holds at most that many texts. Returns the batches
    as lists of indices into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # sorted longest first: the batch's first text sets its padded width
        width = lengths[batches[-1][0]] if batches else 0
        if batches and (len(batches[-1]) + 1) * width <= max_tokens and lengths[i] >= MIN_FILL * width and (
                batch_size is None or len(batches[-1]) < batch_size):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _hidden_states(model: Transformer, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states (B, T, d_model) of ids (B, T): the encoder's for an encoder-decoder, no head run."""
    if model.config.kind == "encoder-decoder":
        return model.encode(ids, mask)
    positions, bound = model._positions(ids, None)
    return _run_stack(model, model.config, model._embed_tokens(ids), causal=model.config.kind == "decoder",
                      mask=mask, positions=positions, position_bound=bound)


def _check(sentences: object, batch_size: int | None, max_tokens: int | None) -> list[str]:
    texts = [sentences] if isinstance(sentences, str) else sentences
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise InputError("embed expects a str or a list of str")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be an integer >= 1 (or None: no limit but max_tokens), got {batch_size!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InputError(f"max_tokens must be an integer >= 1 (tokens per batch, padding included), "
                         f"got {max_tokens!r}")
    return list(texts)


@torch.inference_mode()
def embed(
    model: Transformer,
    tokenizer: Tokenizer,
    sentences: str | list[str],
    *,
    batch_size: int | None = None,
    pooling: str | None = None,
    normalize: bool = True,
    max_length: int | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Embed sentences as pooled final hidden states, L2-normalized by default.

    pooling: 'mean' over real tokens, 'cls', 'last' or 'max'; default the model's
    ``config.pooling``. Texts longer than ``max_length`` (default: the tokenizer's, then the
    model's max_seq_len) are truncated. Texts are sorted by token count and batched so that a
    batch holds at most ``max_tokens`` tokens, padding included (default ``MAX_TOKENS``), and
    at most ``batch_size`` texts when that is given; results do not depend on the batching.
    Returns (N, d_model) float32, or (d_model,) for a single str.
    """
    texts = _check(sentences, batch_size, max_tokens)
    mode = pooling or model.config.pooling
    default = tokenizer.max_length or model.config.max_seq_len
    limit = min(default if max_length is None else max_length, model.config.max_seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(texts), model.config.d_model)
    try:
        for start in range(0, len(texts), CHUNK):
            chunk = [t.strip() for t in texts[start : start + CHUNK]]
            ids, mask = tokenizer.batch(chunk, max_length=limit)  # (N, T_max) each, one tokenizer call
            lengths = mask.sum(1).tolist()
            for index in plan_batches(lengths, max_tokens or MAX_TOKENS, batch_size):
                width = max(lengths[index[0]], 1)
                rows = torch.tensor(index)
                batch_ids, batch_mask = ids[rows, :width].to(device), mask[rows, :width].to(device)  # (B, T)
                uniform = lengths[index[-1]] == lengths[index[0]]  # no padding: attention needs no mask
                hidden = _hidden_states(model, batch_ids, None if uniform else batch_mask)  # (B, T, d_model)
                vectors = pool(hidden.float(), batch_mask, mode)  # (B, d_model)
                out[rows + start] = (F.normalize(vectors, dim=-1) if normalize else vectors).cpu()
    finally:
        model.train(was_training)
    return out[0] if isinstance(sentences, str) else out
