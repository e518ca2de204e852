"""Translate between Hugging Face ``config.json`` dicts and ModelConfig.

The translation reads the fields of each family (GPT-2, the Llama family, BERT) rather than
a registry of model names: any checkpoint of a supported ``model_type`` works whatever
its sizes. ``family_of`` names the weight layout a config uses. The encoder-decoder
families (BART, T5) are translated in ``hf_seq2seq``.
"""

from __future__ import annotations

from typing import Any

from formerkit.checkpoints.special_ids import default_ids, eos_from_hf
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_TYPES = ("gpt2", "bert", "vit", "bart", "t5", *LLAMA_TYPES)

_HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu",
}
_TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_BERT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _seq2seq():
    """The BART/T5 translations, imported on use (that module builds on this one's helpers)."""
    from formerkit.checkpoints import hf_seq2seq

    return hf_seq2seq


def head_from_architectures(hf: dict[str, Any], default: str) -> str:
    """Pick the formerkit head from the ``architectures`` class names of a HF config."""
    for arch in hf.get("architectures") or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            return "lm"
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "mlm"
        if arch.endswith("ForSequenceClassification"):
            return "classifier"
        if arch.endswith("Model"):
            return "none"
    return default


def _activation(hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key, default)
    if name not in _HF_ACTIVATIONS:
        raise ConfigError(f'{key}="{name}" is not supported; formerkit knows {", ".join(_HF_ACTIVATIONS)}')
    return _HF_ACTIVATIONS[name]


def _num_labels(hf: dict[str, Any]) -> int:
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def _label_names(hf: dict[str, Any]) -> list[str] | None:
    """The class names of ``id2label`` in id order, or None: without a map, for transformers' default names
    (LABEL_0, LABEL_1, ...), and for a map formerkit cannot hold (ids not 0..n-1, names not distinct strings)."""
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    by_id = {str(k): v for k, v in id2label.items()}
    names = [by_id.get(str(i)) for i in range(len(by_id))]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _label_maps(cfg: ModelConfig) -> dict[str, dict]:
    """HF's ``id2label`` and ``label2id`` of a classifier: its label_names, else transformers' LABEL_i names."""
    names = cfg.label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)]
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f'RoPE scaling "{rope_type}" is not supported yet; only default RoPE is')
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _from_gpt2(hf: dict[str, Any]) -> dict[str, Any]:
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("GPT-2 configs with scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True "
                          "are not supported")
    d_model = hf.get("n_embd", 768)
    head = head_from_architectures(hf, "lm")
    return {
        "kind": "decoder", "vocab_size": hf.get("vocab_size", 50257), "d_model": d_model,
        "n_layers": hf.get("n_layer", 12), "n_heads": hf.get("n_head", 12),
        "d_ff": hf.get("n_inner") or 4 * d_model, "max_seq_len": hf.get("n_positions", 1024),
        "position": "learned", "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "activation": _activation(hf, "activation_function", "gelu_new"),
        "attn_dropout": hf.get("attn_pdrop", 0.1), "resid_dropout": hf.get("resid_pdrop", 0.1),
        "embed_dropout": hf.get("embd_pdrop", 0.1), "tie_embeddings": hf.get("tie_word_embeddings", True),
        "head": head, "num_labels": _num_labels(hf), "pooling": "last", "pad_token_id": hf.get("pad_token_id"),
    }


def _from_llama(hf: dict[str, Any]) -> dict[str, Any]:
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
        "activation": _activation(hf, "hidden_act", "silu"), "gated": True,
        "qkv_bias": qkv_bias, "out_bias": out_bias, "mlp_bias": bool(hf.get("mlp_bias", False)),
        "qk_norm": model_type == "qwen3", "sliding_window": sliding,
        "attn_dropout": hf.get("attention_dropout", 0.0), "resid_dropout": 0.0, "embed_dropout": 0.0,
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "head": head_from_architectures(hf, "lm"), "num_labels": _num_labels(hf), "pooling": "last",
        "pad_token_id": hf.get("pad_token_id"),
    }


def _from_bert(hf: dict[str, Any]) -> dict[str, Any]:
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
        "norm_eps": hf.get("layer_norm_eps", 1e-12), "activation": _activation(hf, "hidden_act", "gelu"),
        "embed_norm": True, "type_vocab_size": hf.get("type_vocab_size", 2),
        "attn_dropout": hf.get("attention_probs_dropout_prob", 0.1), "resid_dropout": dropout,
        "embed_dropout": dropout, "tie_embeddings": hf.get("tie_word_embeddings", True),
        "head": head, "num_labels": _num_labels(hf), "pooler": head in ("none", "classifier"),
        "pooling": "cls" if head == "classifier" else "mean", "pad_token_id": hf.get("pad_token_id", 0),
    }


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Infer a ModelConfig from a Hugging Face config dict; raise ConfigError if unsupported."""
    model_type = hf.get("model_type")
    if model_type is None:
        raise ConfigError("the Hugging Face config has no model_type; is this a transformers config.json?")
    if model_type == "gpt2":
        values = _from_gpt2(hf)
    elif model_type in LLAMA_TYPES:
        values = _from_llama(hf)
    elif model_type == "bert":
        values = _from_bert(hf)
    elif model_type == "vit":
        values = _from_vit(hf)
    elif model_type == "bart":
        values = _seq2seq().from_bart(hf)
    elif model_type == "t5":
        values = _seq2seq().from_t5(hf)
    else:
        raise ConfigError(f'Hugging Face model_type "{model_type}" is not supported; formerkit reads '
                          f"{', '.join(SUPPORTED_TYPES)}")
    if values["head"] == "classifier" and model_type not in ("bert", "vit"):
        raise ConfigError(f"sequence-classification checkpoints are read for BERT only, not {model_type}")
    if values["head"] == "classifier":
        values["label_names"] = _label_names(hf)
    values["eos_token_id"] = eos_from_hf(hf, values["vocab_size"])
    return ModelConfig.from_dict(values)


def family_of(cfg: ModelConfig) -> str:
    """Name the Hugging Face model_type whose layout can hold ``cfg``, or raise ConfigError."""
    if cfg.patch_size is not None:
        problems = _vit_problems(cfg)
        family = "vit"
    elif cfg.kind == "encoder":
        problems = _mismatches(cfg, position="learned", norm="layernorm", norm_placement="post", final_norm=False,
                               embed_norm=True, gated=False, qkv_bias=True, out_bias=True, mlp_bias=True,
                               norm_bias=True, parallel_block=False, qk_norm=False, embed_scale=False,
                               sliding_window=None, d_head=None, n_kv_heads=None, attn_scale=None,
                               pooler=cfg.head in ("none", "classifier"))  # BertModel and the classifier pool
        if cfg.type_vocab_size == 0:
            problems.append("type_vocab_size=0 (BERT needs token type embeddings)")
        family = "bert"
    elif cfg.kind == "encoder-decoder":
        family, problems = _seq2seq().seq2seq_family(cfg)
    elif cfg.kind == "decoder" and cfg.position == "learned":
        problems = _mismatches(cfg, norm="layernorm", norm_placement="pre", final_norm=True, gated=False,
                               qkv_bias=True, out_bias=True, mlp_bias=True, norm_bias=True, parallel_block=False,
                               qk_norm=False, embed_scale=False, embed_norm=False, type_vocab_size=0,
                               sliding_window=None, d_head=None, n_kv_heads=None, attn_scale=None, pooler=False)
        family = "gpt2"
    elif cfg.kind == "decoder" and cfg.position == "rope":
        problems = _mismatches(cfg, norm="rmsnorm", norm_placement="pre", final_norm=True, gated=True,
                               parallel_block=False, embed_scale=False, embed_norm=False, type_vocab_size=0,
                               attn_scale=None, activation="silu", rotary_fraction=1.0, pooler=False)
        if cfg.qk_norm:
            family = "qwen3"
        elif cfg.qkv_bias and not cfg.out_bias:
            family = "qwen2"
        elif cfg.sliding_window is not None:
            family = "mistral"
        else:
            family = "llama"
        if cfg.qkv_bias != cfg.out_bias and family != "qwen2":
            problems.append("qkv_bias != out_bias (only Qwen2 has biases on q/k/v but not on the output)")
        if cfg.sliding_window is not None and family != "mistral":
            problems.append("sliding_window together with qk_norm or Qwen2-style biases")
    else:
        raise ConfigError(f"no Hugging Face family matches kind={cfg.kind!r} with position={cfg.position!r}; "
                          "save with format='native' instead")
    if cfg.head == "classifier" and family not in ("bert", "vit"):
        problems.append("head='classifier' (only BERT and ViT classifiers are written in the Hugging Face layout)")
    if problems:
        raise ConfigError(f"this config cannot be written as a Hugging Face {family} model: "
                          f"{'; '.join(problems)}; save with format='native' instead")
    return family


def _mismatches(cfg: ModelConfig, **required: Any) -> list[str]:
    return [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in required.items() if getattr(cfg, k) != v]


_ARCH_SUFFIX = {"lm": "ForCausalLM", "mlm": "ForMaskedLM", "classifier": "ForSequenceClassification",
                "none": "Model"}
_ARCH_PREFIX = {"gpt2": "GPT2", "bert": "Bert", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
                "qwen3": "Qwen3"}


def architecture_name(family: str, head: str) -> str:
    """The transformers class name for a family and head, e.g. ('gpt2', 'lm') -> 'GPT2LMHeadModel'."""
    if family == "gpt2" and head == "lm":
        return "GPT2LMHeadModel"
    if family == "vit":
        return "ViTForImageClassification" if head == "classifier" else "ViTModel"
    if family in ("bart", "t5"):
        return _seq2seq().architecture(family, head)
    return _ARCH_PREFIX[family] + _ARCH_SUFFIX[head]


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Return the Hugging Face config dict for ``cfg``; raise ConfigError if no family fits."""
    family = family_of(cfg)
    if family == "vit":
        return _vit_to_hf(cfg)
    common: dict[str, Any] = {
        "model_type": family, "architectures": [architecture_name(family, cfg.head)],
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        **default_ids(family, cfg.vocab_size),  # written out: transformers' defaults may lie outside the vocabulary
    }
    if cfg.head == "classifier":
        common.update(_label_maps(cfg))
    if cfg.pad_token_id is not None:
        common["pad_token_id"] = cfg.pad_token_id
    if cfg.eos_token_id is not None:
        common["eos_token_id"] = cfg.eos_token_id
    if family in ("bart", "t5"):
        return {**common, **_seq2seq().seq2seq_to_hf(cfg, family)}
    if family == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": _TO_HF_ACTIVATION[cfg.activation],
                "attn_pdrop": cfg.attn_dropout, "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embed_dropout}
    if family == "bert":
        return {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
                "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
                "layer_norm_eps": cfg.norm_eps, "hidden_act": _BERT_ACTIVATION[cfg.activation],
                "hidden_dropout_prob": cfg.resid_dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
                "position_embedding_type": "absolute"}
    out = {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "hidden_act": _TO_HF_ACTIVATION[cfg.activation],
           "attention_dropout": cfg.attn_dropout}
    if family in ("llama", "mistral", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if family == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    elif cfg.mlp_bias:
        raise ConfigError(f"mlp_bias=True cannot be written as a Hugging Face {family} model; use format='native'")
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


# ---- ViT: a pre-LN encoder over patches with a CLS token; no token table (vocab_size is unused: 1) ----------
_VIT_HEADS = {"ViTForImageClassification": "classifier", "ViTModel": "none"}


def _square(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"ViT {key}={value} is not square; formerkit reads square images and patches only")
        value = value[0]
    return int(value)


def _from_vit(hf: dict[str, Any]) -> dict[str, Any]:
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
        "activation": _activation(hf, "hidden_act", "gelu"), "qkv_bias": bool(hf.get("qkv_bias", True)),
        "attn_dropout": hf.get("attention_probs_dropout_prob", 0.0), "resid_dropout": dropout,
        "embed_dropout": dropout, "tie_embeddings": False, "head": head, "num_labels": _num_labels(hf),
        "pooler": head == "none", "pooling": "cls", "image_size": image_size, "patch_size": patch_size,
        "num_channels": hf.get("num_channels", 3),
    }


def _vit_problems(cfg: ModelConfig) -> list[str]:
    problems = _mismatches(cfg, position="learned", norm="layernorm", norm_placement="pre", final_norm=True,
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


def _vit_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_type": "vit", "architectures": [architecture_name("vit", cfg.head)], "torch_dtype": "float32",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": _BERT_ACTIVATION[cfg.activation],
        "hidden_dropout_prob": cfg.resid_dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels, "qkv_bias": cfg.qkv_bias,
    }
    if cfg.head == "classifier":
        out.update(_label_maps(cfg))
    else:
        out.update(pooler_output_size=cfg.d_model, pooler_act="tanh")
    return out
