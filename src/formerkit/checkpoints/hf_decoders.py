"""The decoder-only Hugging Face families: GPT-2, and the Llama family (Llama, Mistral, Qwen2, Qwen3).

Each translation reads the family's fields rather than a list of model names, so any size of
a supported ``model_type`` works. GPT-2 is pre-LN with learned positions and Conv1D weights
stored transposed; the Llama family is RMSNorm + RoPE + SwiGLU, told apart by Qwen2's q/k/v
biases, Qwen3's q/k norms and Mistral's sliding window.
"""

from __future__ import annotations

from typing import Any

from formerkit.checkpoints.hf_common import (
    TO_HF_ACTIVATION,
    Family,
    activation,
    architecture_by_suffix,
    head_from_architectures,
    mismatches,
    num_labels,
)
from formerkit.checkpoints.hf_maps import GPT2, LLAMA
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_LLAMA_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_LLAMA_DEFAULT_IDS = {"llama": {"bos_token_id": 1, "eos_token_id": 2},
                      "mistral": {"bos_token_id": 1, "eos_token_id": 2},
                      "qwen2": {"bos_token_id": None, "eos_token_id": None},
                      "qwen3": {"bos_token_id": None, "eos_token_id": None}}


def _gpt2_in(hf: dict[str, Any]) -> dict[str, Any]:
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("GPT-2 configs with scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True "
                          "are not supported")
    d_model = hf.get("n_embd", 768)
    return {
        "kind": "decoder", "vocab_size": hf.get("vocab_size", 50257), "d_model": d_model,
        "n_layers": hf.get("n_layer", 12), "n_heads": hf.get("n_head", 12),
        "d_ff": hf.get("n_inner") or 4 * d_model, "max_seq_len": hf.get("n_positions", 1024),
        "position": "learned", "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "activation": activation(hf, "activation_function", "gelu_new"),
        "attn_dropout": hf.get("attn_pdrop", 0.1), "resid_dropout": hf.get("resid_pdrop", 0.1),
        "embed_dropout": hf.get("embd_pdrop", 0.1), "tie_embeddings": hf.get("tie_word_embeddings", True),
        "head": head_from_architectures(hf, "lm"), "num_labels": num_labels(hf), "pooling": "last",
        "pad_token_id": hf.get("pad_token_id"),
    }


def _gpt2_out(cfg: ModelConfig) -> dict[str, Any]:
    return {"n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": TO_HF_ACTIVATION[cfg.activation], "attn_pdrop": cfg.attn_dropout,
            "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embed_dropout}


def _gpt2_problems(cfg: ModelConfig) -> list[str]:
    return mismatches(cfg, norm="layernorm", norm_placement="pre", final_norm=True, gated=False, qkv_bias=True,
                      out_bias=True, mlp_bias=True, norm_bias=True, parallel_block=False, qk_norm=False,
                      embed_scale=False, embed_norm=False, type_vocab_size=0, sliding_window=None, d_head=None,
                      n_kv_heads=None, attn_scale=None, pooler=False)


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f'RoPE scaling "{rope_type}" is not supported yet; only default RoPE is')
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_in(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of a Llama-family ``config.json`` (also the base of the mixture-of-experts families)."""
    model_type = hf["model_type"]
    n_heads = hf.get("num_attention_heads", 32)
    d_model = hf.get("hidden_size", 4096)
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    else:
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
        raise ConfigError(f"{model_type} with use_sliding_window=True is not supported")
    return {
        "kind": "decoder", "vocab_size": hf.get("vocab_size", 32000), "d_model": d_model,
        "n_layers": hf.get("num_hidden_layers", 32), "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "d_head": hf.get("head_dim") or d_model // n_heads,
        "d_ff": hf.get("intermediate_size", 11008), "max_seq_len": hf.get("max_position_embeddings", 2048),
        "position": "rope", "rope_theta": _rope_theta(hf),
        "norm": "rmsnorm", "norm_bias": False, "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "activation": activation(hf, "hidden_act", "silu"), "gated": True,
        "qkv_bias": qkv_bias, "out_bias": out_bias, "mlp_bias": bool(hf.get("mlp_bias", False)),
        "qk_norm": model_type == "qwen3", "sliding_window": sliding,
        "attn_dropout": hf.get("attention_dropout", 0.0), "resid_dropout": 0.0, "embed_dropout": 0.0,
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "head": head_from_architectures(hf, "lm"), "num_labels": num_labels(hf), "pooling": "last",
        "pad_token_id": hf.get("pad_token_id"),
    }


def llama_variant(cfg: ModelConfig) -> str:
    """Which Llama-family model_type a RoPE decoder is written as: qwen3 (q/k norms), qwen2 (biases on q/k/v
    only), mistral (sliding window), else llama."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def _llama_problems(cfg: ModelConfig) -> list[str]:
    family = llama_variant(cfg)
    problems = mismatches(cfg, norm="rmsnorm", norm_placement="pre", final_norm=True, gated=True,
                          parallel_block=False, embed_scale=False, embed_norm=False, type_vocab_size=0,
                          attn_scale=None, activation="silu", rotary_fraction=1.0, pooler=False)
    if cfg.qkv_bias != cfg.out_bias and family != "qwen2":
        problems.append("qkv_bias != out_bias (only Qwen2 has biases on q/k/v but not on the output)")
    if cfg.sliding_window is not None and family != "mistral":
        problems.append("sliding_window together with qk_norm or Qwen2-style biases")
    if cfg.mlp_bias and family != "llama":
        problems.append(f"mlp_bias=True (a Hugging Face {family} model has no MLP biases)")
    return problems


def _llama_out(cfg: ModelConfig) -> dict[str, Any]:
    family = llama_variant(cfg)
    out = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "hidden_act": TO_HF_ACTIVATION[cfg.activation], "attention_dropout": cfg.attn_dropout}
    if family in ("llama", "mistral", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if family == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def _gpt2_architecture(head: str) -> str:
    return "GPT2LMHeadModel" if head == "lm" else architecture_by_suffix("GPT2")(head)


def _llama_family(model_type: str) -> Family:
    return Family(
        model_type=model_type, kind="decoder", position="rope", config_in=llama_in, config_out=_llama_out,
        problems=_llama_problems, architecture=architecture_by_suffix(_LLAMA_PREFIX[model_type]),
        weights=lambda cfg: LLAMA, base_prefix="model.", fits=lambda cfg: llama_variant(cfg) == model_type,
        ignored=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",), special_ids=_LLAMA_DEFAULT_IDS[model_type],
    )


GPT2_FAMILY = Family(
    model_type="gpt2", kind="decoder", position="learned", config_in=_gpt2_in, config_out=_gpt2_out,
    problems=_gpt2_problems, architecture=_gpt2_architecture, weights=lambda cfg: GPT2, base_prefix="transformer.",
    ignored=(r"h\.\d+\.attn\.(masked_)?bias",), special_ids={"bos_token_id": 50256, "eos_token_id": 50256},
)
DECODER_FAMILIES = (GPT2_FAMILY, *(_llama_family(t) for t in LLAMA_TYPES))
