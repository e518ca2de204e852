"""Sentence embeddings: pooled, optionally normalized hidden states of any model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from formerkit.errors import InputError
from formerkit.heads import pool
from formerkit.model import Transformer
from formerkit.tokenizers import Tokenizer


@torch.no_grad()
def embed(
    model: Transformer,
    tokenizer: Tokenizer,
    sentences: str | list[str],
    *,
    batch_size: int = 32,
    pooling: str | None = None,
    normalize: bool = True,
    max_length: int | None = None,
) -> torch.Tensor:
    """Embed sentences as pooled final hidden states, L2-normalized by default.

    pooling: 'mean' over real tokens, 'cls', 'last' or 'max'; default the model's
    ``config.pooling``. Texts longer than ``max_length`` (default: the tokenizer's, then the
    model's max_seq_len) are truncated. Sentences are batched by length; results do not
    depend on the batch. Returns (N, d_model) float32, or (d_model,) for a single str.
    """
    single = isinstance(sentences, str)
    texts = [sentences] if single else sentences
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise InputError("embed expects a str or a list of str")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    mode = pooling or model.config.pooling
    default = tokenizer.max_length or model.config.max_seq_len
    limit = min(default if max_length is None else max_length, model.config.max_seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
    out = torch.empty(len(texts), model.config.d_model)
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        ids, mask = tokenizer.batch([texts[i].strip() for i in index], max_length=limit)
        hidden = model(ids.to(device), mask.to(device)).hidden_states  # (B, T, d_model)
        vectors = pool(hidden.float(), mask.to(device), mode)  # (B, d_model)
        out[index] = (F.normalize(vectors, dim=-1) if normalize else vectors).cpu()
    model.train(was_training)
    return out[0] if single else out
