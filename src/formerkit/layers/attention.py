"""Multi-head attention (MHA, GQA, MQA), self or cross, with sdpa and eager backends.

The sdpa backend calls ``torch.nn.functional.scaled_dot_product_attention``; the eager
backend materializes the scores and probabilities so ``hook_attn_scores`` and ``hook_pattern``
can see them. A layer switches to eager on its own while either of them has a hook registered.
``hook_result`` (each head's share of the output, (B, T, H, d_model)) is computed only while it
has a hook: one einsum over the heads for a plain projection, the projection once per head otherwise.

Variants (``ModelConfig.attn_type``, ``attn_gate``; tensor code in ``attention_variants``): clipped
softmax (always eager), linear attention (self-attention; a ``LinearKV`` cache entry holds its running
state), low-rank projection of keys and values (encoder self-attention), and a sigmoid gate per head
(``hook_gate``, (B, T, H)) on each head's output before the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.cache import CrossKV, LayerKV, LinearKV
from formerkit.errors import InputError
from formerkit.layers import attention_variants as variants
from formerkit.layers.hooks import HookPoint
from formerkit.layers.linear import Linear
from formerkit.layers.norm import build_norm
from formerkit.layers.position import apply_rotary


class Attention(nn.Module):
    """Scaled dot-product attention over ``n_heads`` query heads sharing ``n_kv_heads`` k/v heads.

    Self-attention projects q, k, v from one fused ``qkv`` matrix; cross-attention projects
    q from the decoder stream (``q``) and k, v from the encoder output (``kv``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        d_head: int,
        *,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        scale: float | None = None,
        qk_norm: tuple[str, float, bool] | None = None,
        cross: bool = False,
        backend: str = "sdpa",
        clip: tuple[float, float] | None = None,
        gate: bool = False,
        linear: str | None = None,
        lowrank: tuple[int, int] | None = None,
    ) -> None:
        """clip: clipped softmax's (gamma, zeta); gate: a sigmoid gate per head; linear: the feature map of
        linear attention ("elu" or "identity"); lowrank: Linformer's (k, max_len) sequence projections."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.dropout = dropout
        self.scale = scale if scale is not None else d_head**-0.5
        self.backend = backend
        self.cross = cross
        if cross:
            self.q = Linear(d_model, n_heads * d_head, bias=qkv_bias)
            self.kv = Linear(d_model, 2 * n_kv_heads * d_head, bias=qkv_bias)
        else:
            self.qkv = Linear(d_model, (n_heads + 2 * n_kv_heads) * d_head, bias=qkv_bias)
        self.out = Linear(n_heads * d_head, d_model, bias=out_bias)
        if qk_norm is not None:
            kind, eps, bias = qk_norm
            self.q_norm = build_norm(kind, d_head, eps, bias)
            self.k_norm = build_norm(kind, d_head, eps, bias)
        else:
            self.q_norm = self.k_norm = None
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()
        self.hook_result = HookPoint()
        self.clip, self.linear = clip, linear
        self.gate = Linear(d_model, n_heads, bias=True) if gate else None
        self.hook_gate = HookPoint() if gate else None  # the gate's logits (B, T, H)
        if lowrank is not None:
            rows, max_len = lowrank
            self.proj_k = nn.Parameter(nn.init.xavier_normal_(torch.empty(rows, max_len)))  # (k, max_len)
            self.proj_v = nn.Parameter(nn.init.xavier_normal_(torch.empty(rows, max_len)))
        else:
            self.proj_k = self.proj_v = None

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        cache: LayerKV | CrossKV | None = None,
    ) -> torch.Tensor:
        """Attend from x (B, T, d_model) to itself, or to ``context`` (B, S, d_model) if cross.

        rope: (cos, sin) for self-attention positions. bias: additive float mask broadcastable
        to (B, H, T, S), or None. is_causal: apply a causal mask when ``bias`` is None.
        cache: a self-attention ``LayerKV`` (new keys/values are written at the slots its cache
        claimed; once the cache held tokens, the whole buffer is attended to and ``bias`` masks
        it), or a ``CrossKV`` (encoder keys/values computed once).
        Returns (B, T, d_model).
        """
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.d_head
        if self.cross:
            q = self.hook_q(self._norm_q(self.q(x).view(B, T, H, D)))
            if isinstance(cache, CrossKV) and cache.k is not None:
                k, v = cache.k, cache.v  # (B, KV, S, D)
            else:
                if context is None:
                    raise ValueError("cross-attention needs the encoder output as `context`")
                k, v = self._project_kv(context)
                if isinstance(cache, CrossKV):
                    cache.k, cache.v = k, v
            q = q.transpose(1, 2)  # (B, H, T, D)
        else:
            qkv = self.qkv(x).view(B, T, H + 2 * KV, D)
            q, k, v = qkv.split([H, KV, KV], dim=2)  # (B, T, H|KV, D)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
            if rope is not None:
                if self.q_norm is None and not (self.hook_q.active or self.hook_k.active):
                    q, k = apply_rotary(qkv[:, :, :H + KV], *rope).split([H, KV], dim=2)  # both in one rotation
                else:
                    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
                q, k = self.hook_rot_q(q), self.hook_rot_k(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T, D)
            if isinstance(cache, LayerKV) and self.linear is None:
                k, v = cache.update(k, v)  # (B, KV, S, D): the whole static buffer, or the new keys alone
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype).clamp(min=torch.finfo(q.dtype).min)
        if self.linear is not None and not self.cross:
            z = self._linear(q, k, v, bias, is_causal, cache)
        elif self.proj_k is not None and not self.cross:
            z = self._lowrank(q, k, v, bias)
        elif self.backend == "eager" or self.clip or self.hook_pattern.active or self.hook_attn_scores.active:
            z = self._eager(q, k, v, bias, is_causal)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=bias,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal and bias is None,
                scale=self.scale,
                enable_gqa=KV != H,
            )  # (B, H, T, D)
        z = z.transpose(1, 2)  # (B, T, H, D)
        if self.gate is not None:
            z = z * torch.sigmoid(self.hook_gate(self.gate(x))).unsqueeze(-1).to(z.dtype)  # gate (B, T, H)
        z = self.hook_z(z)
        if self.hook_result.active:
            return self._per_head_output(z)
        return self.out(z.reshape(B, T, H * D))

    def _per_head_output(self, z: torch.Tensor) -> torch.Tensor:
        """The output projection of z (B, T, H, D) as a sum of per-head results, passed through ``hook_result``.

        For a plain ``Linear`` head h's result is z[..., h, :] times its D columns of the weight (one
        einsum). For any other projection module (int8, adapters) it is ``out`` applied to z with every
        other head zeroed, less ``out`` of zeros (the bias): H times the products, but exact for any
        module. Returns (B, T, d_model).
        """
        B, T, H, D = z.shape
        if type(self.out) in (Linear, nn.Linear):
            w_o = self.out.weight.view(-1, H, D)  # (d_model, H, D)
            result = self.hook_result(torch.einsum("bthd,mhd->bthm", z, w_o))  # (B, T, H, d_model)
            out = result.sum(dim=2)
            return out + self.out.bias if self.out.bias is not None else out
        alone = torch.eye(H, dtype=z.dtype, device=z.device)  # (H, H): row h keeps head h
        spread = z.unsqueeze(2) * alone.view(1, 1, H, H, 1)  # (B, T, H, H, D)
        baseline = self.out(z.new_zeros(1, H * D))  # (1, d_model): the bias, or zeros
        result = self.hook_result(self.out(spread.reshape(B, T, H, H * D)) - baseline)  # (B, T, H, d_model)
        return result.sum(dim=2) + baseline

    def _norm_q(self, q: torch.Tensor) -> torch.Tensor:
        return self.q_norm(q) if self.q_norm is not None else q

    def _project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, KV, S, D) of the encoder output (B, S, d_model)."""
        B, S, _ = context.shape
        KV, D = self.n_kv_heads, self.d_head
        k, v = self.kv(context).split([KV * D, KV * D], dim=-1)
        k, v = k.view(B, S, KV, D), v.view(B, S, KV, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k, v = self.hook_k(k), self.hook_v(v)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _eager(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """Attention with explicit scores and probabilities (B, H, T, S), passed through ``hook_attn_scores``
        and ``hook_pattern``; returns z (B, H, T, D)."""
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale  # (B, H, T, S)
        if bias is not None:
            scores = scores + bias.float()
        elif is_causal:
            T, S = scores.shape[-2:]
            future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        scores = self.hook_attn_scores(scores)  # (B, H, T, S), masked entries at float32's minimum
        probs = variants.clipped_softmax(scores, *self.clip) if self.clip else scores.softmax(dim=-1)
        pattern = self.hook_pattern(probs.to(v.dtype))
        pattern = F.dropout(pattern, self.dropout, self.training)
        return pattern @ v  # (B, H, T, D)

    def _grouped(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, KV, S, D) repeated to one per query head (B, H, S, D)."""
        group = self.n_heads // self.n_kv_heads
        return (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)) if group > 1 else (k, v)

    def _linear(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                is_causal: bool, cache: LayerKV | None) -> torch.Tensor:
        """Linear attention of q (B, H, T, D) over k, v (B, KV, T, D); returns z (B, H, T, D).

        Without a mask it runs in linear time; a mask (padding, or a cached pass) is applied to the
        written-out weights, which ``hook_pattern`` then sees. A ``LinearKV`` cache adds the running
        state of earlier tokens and takes the new tokens' keys into it.
        """
        normalize = self.linear == "elu"
        q, k = variants.feature_map(q, self.linear), variants.feature_map(k, self.linear)
        k, v = self._grouped(k, v)
        if isinstance(cache, LayerKV):
            raise InputError("a linear-attention layer keeps a running state, not keys and values; allocate the "
                             "cache with KVCache.for_model(model, ...)")
        allowed = None
        if bias is not None:  # (B|1, 1|H, T, S) with S = the keys of this pass, or of the cache window
            allowed = bias > torch.finfo(bias.dtype).min / 2
            if isinstance(cache, LinearKV) and cache.attends_window:
                allowed = allowed.index_select(-1, cache.slots)  # the new tokens' own columns (.., T, T)
        if isinstance(cache, LinearKV):
            return self._linear_cached(q, k, v, allowed, normalize, cache)
        if allowed is None and not self.hook_pattern.active:
            return variants.linear_attention(q, k, v, causal=is_causal, normalize=normalize)[0]
        pattern = self.hook_pattern(variants.linear_pattern(q, k, allowed, is_causal, normalize))
        return pattern @ v

    @staticmethod
    def _linear_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                       normalize: bool, cache: LinearKV) -> torch.Tensor:
        """Causal linear attention of new feature-mapped q, k (B, H, T, D), v (B, H, T, D) after the cached state.

        ``allowed`` (B|1, 1, T, T): which new keys each new query may read (causal and padding), or None for all
        earlier ones; a key its own query may not read is padding and stays out of the state, which is
        updated. Returns z (B, H, T, D).
        """
        state = (cache.kv_sum.to(q.dtype), cache.k_sum.to(q.dtype))
        if allowed is None:
            z, state = variants.linear_attention(q, k, v, causal=True, normalize=normalize, state=state)
            cache.store(*state)
            return z
        weights = variants.linear_pattern(q, k, allowed, causal=False, normalize=False)  # (B, H, T, T)
        num = weights @ v + q @ state[0]  # (B, H, T, D)
        den = weights.sum(dim=-1, keepdim=True) + q @ state[1].unsqueeze(-1)  # (B, H, T, 1)
        real = k * allowed.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, H, T, D): padding keys zeroed
        cache.store(state[0] + real.transpose(-1, -2) @ v, state[1] + real.sum(dim=2))
        return num / (den + variants.LINEAR_EPS) if normalize else num

    def _lowrank(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Linformer attention: q (B, H, T, D) over keys and values (B, KV, S, D) projected along the sequence
        to ``k`` rows (padding keys zeroed first); returns z (B, H, T, D)."""
        S = k.shape[2]
        if S > self.proj_k.shape[1]:
            raise InputError(f"low-rank attention projects at most {self.proj_k.shape[1]} keys (max_seq_len), got {S}")
        if bias is not None:  # a key is real where some query may attend to it
            real = (bias > torch.finfo(bias.dtype).min / 2).any(dim=-2).unsqueeze(-1)  # (B|1, 1, S, 1)
            k, v = k * real, v * real
        k, v = variants.project_sequence(k, self.proj_k), variants.project_sequence(v, self.proj_v)  # (B, KV, k, D)
        if self.backend == "eager" or self.clip or self.hook_pattern.active or self.hook_attn_scores.active:
            return self._eager(q, k, v, None, False)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                              scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
