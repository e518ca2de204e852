"""One residual block: self-attention, optional cross-attention, feed-forward.

Norm placement is pre-LN (``x + f(norm(x))``, GPT-2/Llama), post-LN (``norm(x + f(x))``,
the original paper and BERT), or parallel (``x + attn(norm(x)) + mlp(norm(x))``, GPT-J).
"""

from __future__ import annotations

import torch
from torch import nn

from formerkit.cache import CrossKV, LayerKV
from formerkit.config import ModelConfig
from formerkit.layers.attention import Attention
from formerkit.layers.feedforward import FeedForward
from formerkit.layers.hooks import HookPoint
from formerkit.layers.moe import MoE
from formerkit.layers.norm import build_norm


def _feedforward(cfg: ModelConfig) -> nn.Module:
    """The layer's feed-forward: a mixture of experts when ``cfg.n_experts`` > 0 (see ``layer_config``), else dense."""
    if cfg.n_experts == 0:
        return FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated, cfg.mlp_bias)
    depth = cfg.n_layers + (cfg.decoder_layers if cfg.kind == "encoder-decoder" else 0)
    return MoE(cfg.d_model, cfg.expert_d_ff, cfg.n_experts, cfg.experts_per_token, activation=cfg.activation,
               gated=cfg.gated, renormalize=cfg.moe_renormalize, shared_d_ff=cfg.shared_expert_d_ff,
               capacity_factor=cfg.capacity_factor, init_std=cfg.init_std,
               out_std=cfg.init_std / (2 * depth) ** 0.5)  # as the dense fc_out's scaled init


class Block(nn.Module):
    """A Transformer layer built from a config; ``cross`` adds encoder-decoder attention."""

    def __init__(self, cfg: ModelConfig, cross: bool = False) -> None:
        super().__init__()
        self.placement = "parallel" if cfg.parallel_block else cfg.norm_placement

        def norm() -> nn.Module:
            return build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)

        def attention(is_cross: bool) -> Attention:
            return Attention(
                cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim,
                qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, dropout=cfg.attn_dropout,
                scale=cfg.attn_scale,
                qk_norm=(cfg.norm, cfg.norm_eps, cfg.norm_bias) if cfg.qk_norm else None,
                cross=is_cross, backend=cfg.attn_backend,
                clip=(cfg.clip_gamma, cfg.clip_zeta) if cfg.attn_type == "clipped" else None,
                gate=cfg.attn_gate,
                linear=cfg.linear_feature if cfg.attn_type == "linear" and not is_cross else None,
                lowrank=(cfg.lowrank_k, cfg.max_seq_len) if cfg.attn_type == "lowrank" and not is_cross else None,
            )

        self.ln1 = norm()
        self.attn = attention(False)
        self.ln_cross = norm() if cross else None
        self.cross_attn = attention(True) if cross else None
        self.ln2 = None if cfg.parallel_block else norm()
        self.mlp = _feedforward(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        self.hook_cross_attn_out, self.hook_resid_mid_cross = HookPoint(), HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_bias: torch.Tensor | None = None,
        cache: LayerKV | None = None,
        cross_cache: CrossKV | None = None,
    ) -> torch.Tensor:
        """Run the block on x (B, T, d_model); ``context`` is the encoder output for cross-attention.

        cache / cross_cache: this layer's KV cache entries (see ``formerkit.cache``).
        """
        self_attn = lambda h: self.attn(h, rope=rope, bias=bias, is_causal=is_causal, cache=cache)  # noqa: E731
        x = self.hook_resid_pre(x)
        if self.placement == "parallel":
            h = self.ln1(x)
            attn = self.hook_attn_out(self._drop(self_attn(h)))
            mlp = self.hook_mlp_out(self._drop(self.mlp(h)))
            return self.hook_resid_post(x + attn + mlp)
        pre = self.placement == "pre"

        def residual(x: torch.Tensor, norm: nn.Module, fn, hook: HookPoint) -> torch.Tensor:
            out = hook(self._drop(fn(norm(x) if pre else x)))
            return x + out if pre else norm(x + out)

        x = residual(x, self.ln1, self_attn, self.hook_attn_out)
        x = self.hook_resid_mid(x)
        if self.cross_attn is not None:
            x = residual(x, self.ln_cross,
                         lambda h: self.cross_attn(h, bias=context_bias, context=context, cache=cross_cache),
                         self.hook_cross_attn_out)
            x = self.hook_resid_mid_cross(x)
        x = residual(x, self.ln2, self.mlp, self.hook_mlp_out)
        return self.hook_resid_post(x)

    def fill_cache(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                   bias: torch.Tensor | None = None, is_causal: bool = False, cache: LayerKV | None = None) -> None:
        """Take the keys and values of the stream x (B, T, d_model) into this layer's self-attention cache without
        running the layer: what a layer skipped by an early exit keeps for later tokens. The attention's
        output is not used."""
        if cache is not None:
            self.attn(x if self.placement == "post" else self.ln1(x), rope=rope, bias=bias, is_causal=is_causal,
                      cache=cache)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Residual dropout while training; nothing to call in eval mode (decoding pays per call)."""
        return self.dropout(x) if self.training and self.dropout.p > 0 else x
