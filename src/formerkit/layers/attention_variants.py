"""The attention variants ``ModelConfig.attn_type`` selects besides the plain softmax.

- clipped softmax (Bondarenko et al., "Quantizable Transformers"): probabilities stretched to
  ``(zeta - gamma) * softmax + gamma`` and clipped to [0, 1], so a head can give a key exactly zero
  weight without pushing its logits (and the activations behind them) to extremes;
- linear attention (Katharopoulos et al., "Transformers are RNNs"): ``phi(q) (phi(k)^T v)`` with
  ``phi(x) = elu(x) + 1`` and a normaliser, or the unnormalised identity feature map of the linear
  self-attention von Oswald et al. study; causal attention keeps a running state of (D, D) per head,
  so a generated token costs the same whatever came before;
- low-rank attention (Wang et al., "Linformer"): keys and values projected along the sequence to a
  fixed number of rows, for encoders.

These are the tensor functions; ``formerkit.layers.attention.Attention`` calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR_CHUNK = 64  # causal linear attention: tokens per chunk of the chunked (parallel) form
LINEAR_EPS = 1e-6  # added to the normaliser of normalised linear attention


def clipped_softmax(scores: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """``clip((zeta - gamma) * softmax(scores) + gamma, 0, 1)`` over the last dim; same shape as ``scores``."""
    return ((zeta - gamma) * scores.softmax(dim=-1) + gamma).clamp(0.0, 1.0)


def feature_map(x: torch.Tensor, feature: str) -> torch.Tensor:
    """phi(x) of linear attention: ``elu(x) + 1`` (positive, "elu") or x itself ("identity")."""
    return F.elu(x) + 1.0 if feature == "elu" else x


def linear_pattern(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, causal: bool,
                   normalize: bool) -> torch.Tensor:
    """The attention weights (B, H, T, S) linear attention applies, written out: ``phi(q) phi(k)^T`` masked
    (``allowed`` (B|1, 1, T, S) bool, or causal, or nothing) and, when normalised, divided by its row sums.

    q (B, H, T, D) and k (B, H, S, D) are already feature-mapped. This quadratic form serves masked
    batches and hooks; it equals what the linear-time forms compute.
    """
    weights = q @ k.transpose(-1, -2)  # (B, H, T, S)
    if allowed is not None:
        weights = weights * allowed
    elif causal:
        T, S = weights.shape[-2:]
        weights = weights * torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + LINEAR_EPS)
    return weights


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, normalize: bool,
                     state: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Linear attention in linear time over feature-mapped q (B, H, T, D), k (B, H, T, D) and v (B, H, T, E).

    Non-causal: every query reads ``k^T v`` of the whole sequence. Causal: query t reads the keys up
    to t, computed in chunks of ``LINEAR_CHUNK`` (a masked product inside a chunk, running sums across
    chunks), after the keys summarised by ``state``. ``state`` is (S (B, H, D, E), z (B, H, D)): the
    sums of ``phi(k) v^T`` and ``phi(k)`` of earlier tokens. Returns z (B, H, T, E) and the state
    after these tokens (for the next call, as a generation cache holds it).
    """
    B, H, T, D = q.shape
    E = v.shape[-1]
    kv_sum0 = state[0] if state is not None else q.new_zeros(B, H, D, E)
    k_sum0 = state[1] if state is not None else q.new_zeros(B, H, D)
    if not causal:
        kv_sum, k_sum = kv_sum0 + k.transpose(-1, -2) @ v, k_sum0 + k.sum(dim=2)  # (B, H, D, E), (B, H, D)
        num, den = q @ kv_sum, q @ k_sum.unsqueeze(-1)  # (B, H, T, E), (B, H, T, 1)
        return (num / (den + LINEAR_EPS) if normalize else num), (kv_sum, k_sum)
    C = min(LINEAR_CHUNK, T)
    N = -(-T // C)
    pad = N * C - T  # zero keys add nothing; the padded queries' rows are dropped
    qc, kc, vc = (F.pad(t, (0, 0, 0, pad)).view(B, H, N, C, t.shape[-1]) for t in (q, k, v))  # (B, H, N, C, .)
    inside = (qc @ kc.transpose(-1, -2)) * torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # (B,H,N,C,C)
    chunk_kv = kc.transpose(-1, -2) @ vc  # (B, H, N, D, E)
    chunk_k = kc.sum(dim=3)  # (B, H, N, D)
    before_kv = kv_sum0.unsqueeze(2) + chunk_kv.cumsum(dim=2) - chunk_kv  # (B, H, N, D, E): sums of earlier chunks
    before_k = k_sum0.unsqueeze(2) + chunk_k.cumsum(dim=2) - chunk_k  # (B, H, N, D)
    num = inside @ vc + qc @ before_kv  # (B, H, N, C, E)
    den = inside.sum(dim=-1, keepdim=True) + qc @ before_k.unsqueeze(-1)  # (B, H, N, C, 1)
    out = num / (den + LINEAR_EPS) if normalize else num
    new_state = (before_kv[:, :, -1] + chunk_kv[:, :, -1], before_k[:, :, -1] + chunk_k[:, :, -1])
    return out.reshape(B, H, N * C, E)[:, :, :T], new_state


def project_sequence(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Linformer's projection of keys or values x (B, H, S, D) along the sequence by the first S columns of
    ``projection`` (k, max_len); returns (B, H, k, D)."""
    S = x.shape[2]
    return projection[:, :S].to(x.dtype) @ x
