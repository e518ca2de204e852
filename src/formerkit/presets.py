"""Named model shapes. Each preset is a plain dict of ModelConfig fields (data, not code)."""

from __future__ import annotations

from typing import Any

_VASWANI = {
    "kind": "encoder-decoder",
    "vocab_size": 37000,  # shared source/target BPE vocabulary of the paper's En-De setup
    "position": "sinusoidal",
    "norm": "layernorm",
    "norm_placement": "post",
    "final_norm": False,
    "norm_eps": 1e-6,
    "activation": "relu",
    "embed_scale": True,
    "tie_embeddings": True,
    "max_seq_len": 1024,
    # the paper's attention projections are bias-free matrices (W^Q, W^K, W^V, W^O); its FFN has biases
    "qkv_bias": False,
    "out_bias": False,
    # dropout on each sub-layer's output and on the embedding sums (section 5.4), none on attention weights
    "attn_dropout": 0.0,
}

_GPT2 = {
    "kind": "decoder",
    "vocab_size": 50257,
    "max_seq_len": 1024,
    "position": "learned",
    "norm": "layernorm",
    "norm_placement": "pre",
    "norm_eps": 1e-5,
    "activation": "gelu_tanh",
    "tie_embeddings": True,
    "attn_dropout": 0.1,
    "resid_dropout": 0.1,
    "embed_dropout": 0.1,
}

_BERT = {
    "kind": "encoder",
    "vocab_size": 30522,
    "max_seq_len": 512,
    "position": "learned",
    "norm": "layernorm",
    "norm_placement": "post",
    "final_norm": False,
    "norm_eps": 1e-12,
    "activation": "gelu",
    "embed_norm": True,
    "type_vocab_size": 2,
    "tie_embeddings": True,
    "pad_token_id": 0,
    "attn_dropout": 0.1,
    "resid_dropout": 0.1,
    "embed_dropout": 0.1,
}

# ViT (Dosovitskiy et al.): a pre-LN encoder over image patches, a CLS token, exact GELU. There is no
# token table, so vocab_size is unused (1).
_VIT = {
    "kind": "encoder",
    "vocab_size": 1,
    "position": "learned",
    "norm": "layernorm",
    "norm_placement": "pre",
    "norm_eps": 1e-12,
    "activation": "gelu",
    "qkv_bias": True,
    "tie_embeddings": False,
    "head": "classifier",
    "pooling": "cls",
    "attn_dropout": 0.0,
    "resid_dropout": 0.0,
    "embed_dropout": 0.0,
}

# T5 (Raffel et al.): relative position buckets, RMSNorm without bias, no attention scaling, no biases
_T5 = {
    "kind": "encoder-decoder",
    "vocab_size": 32128,
    "d_model": 512,
    "d_head": 64,
    "max_seq_len": 512,
    "position": "relative",
    "norm": "rmsnorm",
    "norm_bias": False,
    "norm_eps": 1e-6,
    "attn_scale": 1.0,
    "qkv_bias": False,
    "out_bias": False,
    "mlp_bias": False,
    "attn_dropout": 0.1,
    "resid_dropout": 0.1,
    "embed_dropout": 0.1,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "vaswani-base": {**_VASWANI, "d_model": 512, "n_heads": 8, "d_ff": 2048, "n_layers": 6,
                     "n_decoder_layers": 6, "resid_dropout": 0.1, "embed_dropout": 0.1},
    "vaswani-big": {**_VASWANI, "d_model": 1024, "n_heads": 16, "d_ff": 4096, "n_layers": 6,
                    "n_decoder_layers": 6, "resid_dropout": 0.3, "embed_dropout": 0.3},
    "gpt2": {**_GPT2, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},
    "gpt2-medium": {**_GPT2, "d_model": 1024, "n_layers": 24, "n_heads": 16, "d_ff": 4096},
    "bert-base": {**_BERT, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072,
                  "head": "mlm"},
    "minilm-l6": {**_BERT, "d_model": 384, "n_layers": 6, "n_heads": 12, "d_ff": 1536,
                  "head": "none", "pooler": True, "pooling": "mean"},
    # BART (Lewis et al.): learned positions read at offset 2, post-LN, embedding LayerNorm, GELU
    "bart-base": {"kind": "encoder-decoder", "vocab_size": 50265, "d_model": 768, "n_layers": 6,
                  "n_decoder_layers": 6, "n_heads": 12, "d_ff": 3072, "max_seq_len": 1024, "position_offset": 2,
                  "norm_placement": "post", "final_norm": False, "activation": "gelu", "embed_norm": True,
                  "resid_dropout": 0.1, "embed_dropout": 0.1, "pad_token_id": 1, "eos_token_id": 2,
                  "decoder_start_token_id": 2,
                  "lm_head_bias": True},
    "t5-small": {**_T5, "n_layers": 6, "n_decoder_layers": 6, "n_heads": 8, "d_ff": 2048, "activation": "relu",
                 "lm_head_scale": True},
    # T5 v1.1: gated-GELU feed-forward, untied output projection
    "t5-v1.1-small": {**_T5, "n_layers": 8, "n_decoder_layers": 8, "n_heads": 6, "d_ff": 1024,
                      "activation": "gelu_tanh", "gated": True, "tie_embeddings": False},
    "vit": {**_VIT, "image_size": 224, "patch_size": 16, "num_channels": 3, "max_seq_len": 197,
            "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072, "num_labels": 1000},
    # a small ViT for sklearn's 8x8 handwritten digits (examples/digits.yaml)
    "vit-digits": {**_VIT, "image_size": 8, "patch_size": 2, "num_channels": 1, "max_seq_len": 17,
                   "d_model": 64, "n_layers": 4, "n_heads": 4, "d_ff": 128, "num_labels": 10},
    "llama": {
        "kind": "decoder",
        "vocab_size": 32000,
        "d_model": 512,
        "n_layers": 8,
        "n_heads": 8,
        "n_kv_heads": 2,
        "d_ff": 1376,
        "max_seq_len": 2048,
        "position": "rope",
        "rope_theta": 10000.0,
        "norm": "rmsnorm",
        "norm_bias": False,
        "norm_eps": 1e-5,
        "activation": "silu",
        "gated": True,
        "qkv_bias": False,
        "out_bias": False,
        "mlp_bias": False,
        "tie_embeddings": False,
    },
}
