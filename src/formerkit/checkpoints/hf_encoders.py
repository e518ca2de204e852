"""The encoder-only Hugging Face families: BERT (post-LN, token types, learned positions) and ViT.

ViT is a pre-LN encoder over image patches with a CLS token and no token table (its
``vocab_size`` is unused: 1); transformers' ``ViTModel`` carries a tanh pooler,
``ViTForImageClassification`` a linear classifier over the final-normed CLS token.
"""

from __future__ import annotations

from typing import Any

from formerkit.checkpoints.hf_common import (
    Family,
    activation,
    architecture_by_suffix,
    head_from_architectures,
    mismatches,
    num_labels,
)
from formerkit.checkpoints.hf_maps import BERT, VIT
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

_BERT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
_VIT_HEADS = {"ViTForImageClassification": "classifier", "ViTModel": "none"}


def _bert_in(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f'BERT position_embedding_type="{hf["position_embedding_type"]}" is not supported; '
                          'only "absolute" is')
    head = head_from_architectures(hf, "none")
    dropout = hf.get("hidden_dropout_prob", 0.1)
    return {
        "kind": "encoder", "vocab_size": hf.get("vocab_size", 30522), "d_model": hf.get("hidden_size", 768),
        "n_layers": hf.get("num_hidden_layers", 12), "n_heads": hf.get("num_attention_heads", 12),
        "d_ff": hf.get("intermediate_size", 3072), "max_seq_len": hf.get("max_position_embeddings", 512),
        "position": "learned", "norm": "layernorm", "norm_placement": "post", "final_norm": False,
        "norm_eps": hf.get("layer_norm_eps", 1e-12), "activation": activation(hf, "hidden_act", "gelu"),
        "embed_norm": True, "type_vocab_size": hf.get("type_vocab_size", 2),
        "attn_dropout": hf.get("attention_probs_dropout_prob", 0.1), "resid_dropout": dropout,
        "embed_dropout": dropout, "tie_embeddings": hf.get("tie_word_embeddings", True),
        "head": head, "num_labels": num_labels(hf), "pooler": head in ("none", "classifier"),
        "pooling": "cls" if head == "classifier" else "mean", "pad_token_id": hf.get("pad_token_id", 0),
    }


def _bert_out(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps,
            "hidden_act": _BERT_ACTIVATION[cfg.activation], "hidden_dropout_prob": cfg.resid_dropout,
            "attention_probs_dropout_prob": cfg.attn_dropout, "position_embedding_type": "absolute"}


def _bert_problems(cfg: ModelConfig) -> list[str]:
    problems = mismatches(cfg, position="learned", norm="layernorm", norm_placement="post", final_norm=False,
                          embed_norm=True, gated=False, qkv_bias=True, out_bias=True, mlp_bias=True, norm_bias=True,
                          parallel_block=False, qk_norm=False, embed_scale=False, sliding_window=None, d_head=None,
                          n_kv_heads=None, attn_scale=None,
                          pooler=cfg.head in ("none", "classifier"))  # BertModel and the classifier pool
    if cfg.type_vocab_size == 0:
        problems.append("type_vocab_size=0 (BERT needs token type embeddings)")
    return problems


def _square(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"ViT {key}={value} is not square; formerkit reads square images and patches only")
        value = value[0]
    return int(value)


def _vit_in(hf: dict[str, Any]) -> dict[str, Any]:
    architectures = hf.get("architectures") or ["ViTModel"]
    heads = [_VIT_HEADS[a] for a in architectures if a in _VIT_HEADS]
    if not heads:
        raise ConfigError(f"ViT architecture {', '.join(architectures)} is not supported; formerkit reads "
                          f"{' and '.join(_VIT_HEADS)}")
    head = heads[0]
    d_model = hf.get("hidden_size", 768)
    pooler_size = hf.get("pooler_output_size")
    if head == "none" and (hf.get("pooler_act", "tanh") != "tanh" or pooler_size not in (None, d_model)):
        raise ConfigError("ViTModel with a pooler other than tanh(dense) of size hidden_size is not supported")
    image_size, patch_size = _square(hf, "image_size", 224), _square(hf, "patch_size", 16)
    dropout = hf.get("hidden_dropout_prob", 0.0)
    return {
        "kind": "encoder", "vocab_size": 1, "d_model": d_model, "n_layers": hf.get("num_hidden_layers", 12),
        "n_heads": hf.get("num_attention_heads", 12), "d_ff": hf.get("intermediate_size", 3072),
        "max_seq_len": (image_size // patch_size) ** 2 + 1, "position": "learned", "norm": "layernorm",
        "norm_placement": "pre", "final_norm": True, "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "activation": activation(hf, "hidden_act", "gelu"), "qkv_bias": bool(hf.get("qkv_bias", True)),
        "attn_dropout": hf.get("attention_probs_dropout_prob", 0.0), "resid_dropout": dropout,
        "embed_dropout": dropout, "tie_embeddings": False, "head": head, "num_labels": num_labels(hf),
        "pooler": head == "none", "pooling": "cls", "image_size": image_size, "patch_size": patch_size,
        "num_channels": hf.get("num_channels", 3),
    }


def _vit_problems(cfg: ModelConfig) -> list[str]:
    problems = mismatches(cfg, position="learned", norm="layernorm", norm_placement="pre", final_norm=True,
                          embed_norm=False, gated=False, out_bias=True, mlp_bias=True, norm_bias=True,
                          parallel_block=False, qk_norm=False, embed_scale=False, sliding_window=None, d_head=None,
                          n_kv_heads=None, attn_scale=None, pooling="cls", position_offset=0)
    if cfg.max_seq_len != cfg.num_image_tokens:
        problems.append(f"max_seq_len={cfg.max_seq_len} (needs {cfg.num_image_tokens}: ViT has one position per "
                        "patch plus the CLS token)")
    if cfg.head == "none" and not cfg.pooler:
        problems.append("pooler=False (ViTModel carries a tanh pooler over the CLS token)")
    if cfg.head == "classifier" and cfg.pooler:
        problems.append("pooler=True (ViTForImageClassification has no pooler)")
    return problems


def _vit_out(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": _BERT_ACTIVATION[cfg.activation],
        "hidden_dropout_prob": cfg.resid_dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels, "qkv_bias": cfg.qkv_bias,
    }
    if cfg.head != "classifier":
        out.update(pooler_output_size=cfg.d_model, pooler_act="tanh")
    return out


def _vit_architecture(head: str) -> str:
    return "ViTForImageClassification" if head == "classifier" else "ViTModel"


BERT_FAMILY = Family(
    model_type="bert", kind="encoder", position=None, config_in=_bert_in, config_out=_bert_out,
    problems=_bert_problems, architecture=architecture_by_suffix("Bert"), weights=lambda cfg: BERT,
    base_prefix="bert.", special_ids={"pad_token_id": 0}, classifier=True,
    ignored=(r"embeddings\.position_ids", r"cls\.predictions\.decoder\.bias", r"cls\.seq_relationship\..*"),
)
VIT_FAMILY = Family(
    model_type="vit", kind="encoder", position=None, images=True, config_in=_vit_in, config_out=_vit_out,
    problems=_vit_problems, architecture=_vit_architecture, weights=lambda cfg: VIT, base_prefix="vit.",
    classifier=True,
)
ENCODER_FAMILIES = (BERT_FAMILY, VIT_FAMILY)
