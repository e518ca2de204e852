"""The mixture-of-experts Hugging Face families: Mixtral and Qwen2-MoE.

Both are the Llama layout (RMSNorm, RoPE, SwiGLU experts) with sparse feed-forwards. Mixtral
routes every layer, renormalises its top-k weights and has no biases; Qwen2-MoE adds q/k/v biases,
a sigmoid-gated shared expert, optional renormalisation (``norm_topk_prob``) and dense layers
(``decoder_sparse_step``, ``mlp_only_layers``). A config is written as Qwen2-MoE when it has any
of those, else as Mixtral.
"""

from __future__ import annotations

from typing import Any

from formerkit.checkpoints.hf_common import TO_HF_ACTIVATION, Family, architecture_by_suffix, mismatches
from formerkit.checkpoints.hf_decoders import llama_in
from formerkit.checkpoints.hf_maps import mixtral_table, qwen2_moe_table
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError


def moe_variant(cfg: ModelConfig) -> str:
    """Which family a mixture of experts is written as: qwen2_moe (q/k/v biases, a shared expert, raw top-k
    weights or dense layers), else mixtral."""
    qwen = (cfg.qkv_bias or cfg.shared_expert_d_ff > 0 or not cfg.moe_renormalize or cfg.moe_layer_step != 1
            or bool(cfg.moe_dense_layers))
    return "qwen2_moe" if qwen else "mixtral"


def _mixtral_in(hf: dict[str, Any]) -> dict[str, Any]:
    values = llama_in(hf)
    values.update(n_experts=hf.get("num_local_experts", 8), experts_per_token=hf.get("num_experts_per_tok", 2),
                  sliding_window=hf.get("sliding_window"), moe_renormalize=True)
    return values


def _qwen2_moe_in(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window", False):
        raise ConfigError("qwen2_moe with use_sliding_window=True is not supported")
    if hf.get("num_experts", 60) and not hf.get("shared_expert_intermediate_size", 5632):
        raise ConfigError("qwen2_moe with shared_expert_intermediate_size=0 is not supported (transformers still "
                          "builds an empty shared expert)")
    values = llama_in(hf)
    values.update(
        qkv_bias=bool(hf.get("qkv_bias", True)), out_bias=False, n_experts=hf.get("num_experts", 60),
        experts_per_token=hf.get("num_experts_per_tok", 4), moe_d_ff=hf.get("moe_intermediate_size", 1408),
        moe_renormalize=bool(hf.get("norm_topk_prob", False)),
        shared_expert_d_ff=hf.get("shared_expert_intermediate_size", 5632) if hf.get("num_experts", 60) else 0,
        moe_layer_step=hf.get("decoder_sparse_step", 1), moe_dense_layers=hf.get("mlp_only_layers") or None,
    )
    return values


def _common_out(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": TO_HF_ACTIVATION[cfg.activation],
            "attention_dropout": cfg.attn_dropout, "num_experts_per_tok": cfg.experts_per_token}


def _mixtral_out(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common_out(cfg), "intermediate_size": cfg.expert_d_ff, "num_local_experts": cfg.n_experts,
            "sliding_window": cfg.sliding_window}


def _qwen2_moe_out(cfg: ModelConfig) -> dict[str, Any]:
    return {**_common_out(cfg), "intermediate_size": cfg.d_ff, "moe_intermediate_size": cfg.expert_d_ff,
            "num_experts": cfg.n_experts, "shared_expert_intermediate_size": cfg.shared_expert_d_ff,
            "norm_topk_prob": cfg.moe_renormalize, "decoder_sparse_step": cfg.moe_layer_step,
            "mlp_only_layers": cfg.moe_dense_layers or [], "qkv_bias": cfg.qkv_bias, "use_sliding_window": False}


def _shared_problems(cfg: ModelConfig) -> list[str]:
    return mismatches(cfg, norm="rmsnorm", norm_placement="pre", final_norm=True, gated=True, parallel_block=False,
                      embed_scale=False, embed_norm=False, type_vocab_size=0, attn_scale=None, activation="silu",
                      rotary_fraction=1.0, pooler=False, qk_norm=False, out_bias=False)


def _mixtral_problems(cfg: ModelConfig) -> list[str]:
    return _shared_problems(cfg) + mismatches(cfg, qkv_bias=False)


def _qwen2_moe_problems(cfg: ModelConfig) -> list[str]:
    problems = _shared_problems(cfg) + mismatches(cfg, qkv_bias=True, sliding_window=None, mlp_bias=False)
    if cfg.shared_expert_d_ff == 0:
        problems.append("shared_expert_d_ff=0 (a Hugging Face qwen2_moe model always has a shared expert)")
    return problems


def _family(model_type: str, prefix: str, config_in, config_out, problems, table, special_ids) -> Family:
    return Family(
        model_type=model_type, kind="decoder", position="rope", config_in=config_in, config_out=config_out,
        problems=problems, architecture=architecture_by_suffix(prefix),
        weights=lambda cfg: table(cfg.n_experts), base_prefix="model.", experts=True,
        fits=lambda cfg: moe_variant(cfg) == model_type,
        ignored=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",), special_ids=special_ids,
    )


MOE_FAMILIES = (
    _family("mixtral", "Mixtral", _mixtral_in, _mixtral_out, _mixtral_problems, mixtral_table,
            {"bos_token_id": 1, "eos_token_id": 2}),
    _family("qwen2_moe", "Qwen2Moe", _qwen2_moe_in, _qwen2_moe_out, _qwen2_moe_problems, qwen2_moe_table,
            {"bos_token_id": None, "eos_token_id": None}),
)
