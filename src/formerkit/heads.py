"""Output heads and their losses: causal LM, masked LM, sequence classification, pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.layers.feedforward import ACTIVATIONS
from formerkit.layers.linear import Linear
from formerkit.layers.norm import build_norm

IGNORE_INDEX = -100


class ExitHeads(nn.Module):
    """The early exits of a decoder: after each exit layer a norm and either the model's LM head (shared) or a
    projection of its own (separate) turn the residual stream into next-token logits."""

    def __init__(self, d_model: int, vocab_size: int, n_exits: int, *, separate: bool, norm: tuple[str, float, bool]
                 ) -> None:
        super().__init__()
        kind, eps, bias = norm
        self.norms = nn.ModuleList(build_norm(kind, d_model, eps, bias) for _ in range(n_exits))
        self.projs = (nn.ModuleList(Linear(d_model, vocab_size, bias=False) for _ in range(n_exits))
                      if separate else None)

    def forward(self, index: int, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Logits (B, T, vocab) of exit ``index`` from the stream (B, T, d_model) after its layer."""
        normed = self.norms[index](hidden)
        return self.projs[index](normed) if self.projs is not None else lm_head(normed)


class LMHead(nn.Module):
    """Project hidden states to vocabulary logits.

    With ``transform`` (BERT's masked-LM head) a dense layer, activation and norm come first;
    with ``scale`` the hidden states are multiplied by it before the projection (T5).
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        *,
        bias: bool,
        transform: tuple[str, str, float, bool] | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.scale = scale
        if transform is not None:
            activation, norm, eps, norm_bias = transform
            self.dense = Linear(d_model, d_model)
            self.act = ACTIVATIONS[activation]
            self.norm = build_norm(norm, d_model, eps, norm_bias)
        else:
            self.dense = self.norm = None
        self.proj = Linear(d_model, vocab_size, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map hidden (B, T, d_model) to logits (B, T, vocab_size)."""
        if self.dense is not None:
            hidden = self.norm(self.act(self.dense(hidden)))
        if self.scale is not None:
            hidden = hidden * self.scale
        return self.proj(hidden)


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(first token's hidden state))."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.dense = Linear(d_model, d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map hidden (B, T, d_model) to (B, d_model)."""
        return torch.tanh(self.dense(hidden[:, 0]))


class ClassifierHead(nn.Module):
    """Dropout and a linear map from a pooled vector to ``num_labels`` scores."""

    def __init__(self, d_model: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = Linear(d_model, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Map pooled (B, d_model) to logits (B, num_labels)."""
        return self.out(self.dropout(pooled))


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Reduce hidden (B, T, D) to (B, D) over the real tokens marked 1 in mask (B, T).

    mode: 'mean' (average of real tokens), 'cls' (first token), 'last' (last real token),
    'max' (elementwise max over real tokens). A row without real tokens pools to zeros.
    """
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.long().cumsum(-1).argmax(-1)  # index of the last 1 in each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    if mode == "max":  # a row with no real token pools to zeros, as 'mean' does
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1) * (weights.sum(1) > 0)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at t predict labels at t+1; -100 is ignored."""
    return token_loss(logits[:, :-1], labels[:, 1:])


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against labels (B, T) at the same positions; -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)  # any integer dtype of labels (cross_entropy takes int64)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over classes, or mean squared error when there is one output (regression)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())
