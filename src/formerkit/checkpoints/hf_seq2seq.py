"""The encoder-decoder Hugging Face families, BART and T5: config translations and registry entries.

BART: learned positions read at ``position + 2``, post-LN with a norm of the summed
embeddings, a bias on the logits (``final_logits_bias``), token embeddings optionally scaled
by sqrt(d_model), one embedding table shared by encoder, decoder and (tied) output.
T5: a learned relative position bias per stack, RMSNorm before each sublayer, no biases,
unscaled attention scores, a ReLU MLP (original) or gated-GELU (v1.1), and decoder outputs
rescaled by d_model ** -0.5 before a tied output projection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from formerkit.checkpoints.hf_common import (
    HF_ACTIVATIONS,
    TO_HF_ACTIVATION,
    Family,
    activation,
    head_from_architectures,
    mismatches,
)
from formerkit.checkpoints.hf_maps import BART, T5, T5_GATED
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

BART_POSITION_OFFSET = 2  # BART's learned position table has two extra rows, read at position + 2
_ARCH_PREFIX = {"bart": "Bart", "t5": "T5"}


def _head(hf: dict[str, Any], family: str) -> str:
    """The head of a BART/T5 checkpoint: 'lm' (ForConditionalGeneration) or 'none' (the base model)."""
    known = {f"{_ARCH_PREFIX[family]}ForConditionalGeneration", f"{_ARCH_PREFIX[family]}Model"}
    others = [arch for arch in hf.get("architectures") or [] if arch not in known]
    if others:
        raise ConfigError(f"{family} architecture {others[0]} is not supported; formerkit reads "
                          f"{' and '.join(sorted(known))}")
    return head_from_architectures(hf, "lm")


def _bart_in(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a BART ``config.json`` dict; ConfigError for what formerkit cannot express.

    The decoder's head count and feed-forward width become ``decoder_n_heads``/``decoder_d_ff``
    where they differ from the encoder's (null where equal).
    """
    head = _head(hf, "bart")
    dropout = hf.get("dropout", 0.1)
    heads, ffn = hf.get("encoder_attention_heads", 16), hf.get("encoder_ffn_dim", 4096)
    decoder_heads, decoder_ffn = hf.get("decoder_attention_heads", 16), hf.get("decoder_ffn_dim", 4096)
    return {
        "kind": "encoder-decoder", "vocab_size": hf.get("vocab_size", 50265), "d_model": hf.get("d_model", 1024),
        "n_layers": hf.get("encoder_layers", 12), "n_decoder_layers": hf.get("decoder_layers", 12),
        "n_heads": heads, "d_ff": ffn, "decoder_n_heads": decoder_heads if decoder_heads != heads else None,
        "decoder_d_ff": decoder_ffn if decoder_ffn != ffn else None,
        "max_seq_len": hf.get("max_position_embeddings", 1024), "position": "learned",
        "position_offset": BART_POSITION_OFFSET, "norm": "layernorm", "norm_eps": 1e-5, "norm_placement": "post",
        "final_norm": False, "embed_norm": True, "activation": activation(hf, "activation_function", "gelu"),
        "attn_dropout": hf.get("attention_dropout", 0.0), "resid_dropout": dropout, "embed_dropout": dropout,
        "embed_scale": bool(hf.get("scale_embedding", False)), "tie_embeddings": hf.get("tie_word_embeddings", True),
        "head": head, "lm_head_bias": head == "lm", "pad_token_id": hf.get("pad_token_id", 1),
        "decoder_start_token_id": hf.get("decoder_start_token_id", 2),
    }


def _t5_mlp(hf: dict[str, Any]) -> tuple[str, bool]:
    """(activation, gated) of T5's ``feed_forward_proj``: 'relu', 'gated-gelu' (v1.1, tanh GELU), 'gated-silu', ..."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(f'feed_forward_proj="{proj}" is not a T5 feed-forward type; use "ACT" or "gated-ACT"')
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]  # T5 v1.1's "gated-gelu" is the tanh approximation
    if name not in HF_ACTIVATIONS:
        raise ConfigError(f'feed_forward_proj="{proj}": activation "{name}" is not supported; formerkit knows '
                          f'{", ".join(HF_ACTIVATIONS)}')
    return HF_ACTIVATIONS[name], len(parts) == 2


def _t5_in(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a T5 ``config.json`` dict (original T5 and v1.1); ConfigError if unsupported."""
    act, gated = _t5_mlp(hf)
    head = _head(hf, "t5")
    tie = hf.get("tie_word_embeddings", True)
    # transformers 5 writes scale_decoder_outputs; older configs rescale exactly when the head is tied
    scale = bool(hf.get("scale_decoder_outputs", tie))
    dropout = hf.get("dropout_rate", 0.1)
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    n_layers = hf.get("num_layers", 6)
    return {
        "kind": "encoder-decoder", "vocab_size": hf.get("vocab_size", 32128), "d_model": hf.get("d_model", 512),
        "n_layers": n_layers, "n_decoder_layers": hf.get("num_decoder_layers") or n_layers,
        "n_heads": hf.get("num_heads", 8), "d_head": hf.get("d_kv", 64), "d_ff": hf.get("d_ff", 2048),
        "max_seq_len": hf.get("n_positions", 512), "position": "relative",
        "relative_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_max_distance": hf.get("relative_attention_max_distance", 128),
        "norm": "rmsnorm", "norm_bias": False, "norm_eps": hf.get("layer_norm_epsilon", 1e-6),
        "norm_placement": "pre", "final_norm": True, "activation": act, "gated": gated,
        "qkv_bias": False, "out_bias": False, "mlp_bias": False, "attn_scale": 1.0,
        "attn_dropout": dropout, "resid_dropout": dropout, "embed_dropout": dropout,
        "tie_embeddings": tie, "lm_head_scale": scale and head == "lm", "head": head, "pad_token_id": pad,
        "decoder_start_token_id": start if start is not None else pad,  # T5 starts decoding from its pad token
    }


_COMMON = dict(parallel_block=False, qk_norm=False, sliding_window=None, n_kv_heads=None, decoder_n_kv_heads=None,
               pooler=False)


def _head_problems(cfg: ModelConfig, family: str) -> list[str]:
    if cfg.head in ("lm", "none"):
        return []
    return [f"head={cfg.head!r} ({family} is written as a conditional-generation or base model)"]


def _bart_problems(cfg: ModelConfig) -> list[str]:
    return mismatches(cfg, position_offset=BART_POSITION_OFFSET, norm="layernorm", norm_bias=True, norm_eps=1e-5,
                      norm_placement="post", final_norm=False, embed_norm=True, gated=False, qkv_bias=True,
                      out_bias=True, mlp_bias=True, d_head=None, attn_scale=None, lm_head_scale=False,
                      lm_head_bias=cfg.head == "lm", **_COMMON) + _head_problems(cfg, "bart")


def _t5_problems(cfg: ModelConfig) -> list[str]:
    problems = mismatches(cfg, norm="rmsnorm", norm_placement="pre", final_norm=True, embed_norm=False,
                          embed_scale=False, qkv_bias=False, out_bias=False, mlp_bias=False, attn_scale=1.0,
                          lm_head_bias=False, **_COMMON)
    if cfg.gated and cfg.activation == "gelu":
        problems.append("gated exact GELU (T5's 'gated-gelu' is the tanh approximation; use gelu_tanh)")
    for name, shared in [("decoder_n_heads", "n_heads"), ("decoder_d_ff", "d_ff")]:
        if getattr(cfg, name) not in (None, getattr(cfg, shared)):  # T5 has one num_heads and d_ff for both stacks
            problems.append(f"{name}={getattr(cfg, name)} (needs {getattr(cfg, shared)} or null: T5's stacks "
                            f"share {shared})")
    return problems + _head_problems(cfg, "t5")


def _architecture(family: str) -> Callable[[str], str]:
    """The transformers class of a BART/T5 head: ``...ForConditionalGeneration`` or the base ``...Model``."""
    return lambda head: _ARCH_PREFIX[family] + ("ForConditionalGeneration" if head == "lm" else "Model")


def _shared_out(cfg: ModelConfig) -> dict[str, Any]:
    start = cfg.decoder_start_token_id
    if start is None:  # decoding starts from the pad token: what the readers take a null start for
        start = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return {"is_encoder_decoder": True, "decoder_start_token_id": start}


def _bart_out(cfg: ModelConfig) -> dict[str, Any]:
    return {**_shared_out(cfg), "d_model": cfg.d_model, "encoder_layers": cfg.n_layers,
            "decoder_layers": cfg.decoder_layers, "encoder_attention_heads": cfg.n_heads,
            "decoder_attention_heads": cfg.decoder_heads, "encoder_ffn_dim": cfg.d_ff,
            "decoder_ffn_dim": cfg.decoder_ff,
            "max_position_embeddings": cfg.max_seq_len, "activation_function": TO_HF_ACTIVATION[cfg.activation],
            "dropout": cfg.resid_dropout, "attention_dropout": cfg.attn_dropout, "activation_dropout": 0.0,
            "scale_embedding": cfg.embed_scale}


def _t5_out(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu" if cfg.gated else "gelu_new"}.get(cfg.activation, cfg.activation)
    return {**_shared_out(cfg), "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
            "num_layers": cfg.n_layers, "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.n_heads,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance, "dropout_rate": cfg.resid_dropout,
            "layer_norm_epsilon": cfg.norm_eps, "n_positions": cfg.max_seq_len,
            "feed_forward_proj": f"gated-{act}" if cfg.gated else act,
            "scale_decoder_outputs": cfg.lm_head_scale}


BART_FAMILY = Family(
    model_type="bart", kind="encoder-decoder", position="learned", config_in=_bart_in, config_out=_bart_out,
    problems=_bart_problems, architecture=_architecture("bart"), weights=lambda cfg: BART, base_prefix="model.",
    special_ids={"bos_token_id": 0, "eos_token_id": 2, "forced_eos_token_id": 2, "pad_token_id": 1},
)
T5_FAMILY = Family(
    model_type="t5", kind="encoder-decoder", position="relative", config_in=_t5_in, config_out=_t5_out,
    problems=_t5_problems, architecture=_architecture("t5"), weights=lambda cfg: T5_GATED if cfg.gated else T5,
    base_prefix="", special_ids={"eos_token_id": 1, "pad_token_id": 0},
    ignored=(r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",),  # unused by T5
)
SEQ2SEQ_FAMILIES = (BART_FAMILY, T5_FAMILY)
