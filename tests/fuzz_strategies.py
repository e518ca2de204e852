"""Hypothesis strategies shared by the fuzz tests (tests/test_fuzz_*.py): tiny model configs and inputs for them."""

from __future__ import annotations

from typing import Any, get_args

import torch
from hypothesis import strategies as st

import formerkit as fk
from formerkit import config as fk_config
from formerkit.presets import PRESETS

TEXT_PRESETS = ("gpt2", "llama", "bert-base", "minilm-l6", "vaswani-base", "bart-base", "t5-small", "t5-v1.1-small")
IMAGE_PRESETS = ("vit-digits",)


def choices(literal: Any) -> st.SearchStrategy:
    """One of the values of a ``Literal`` type of formerkit.config (kind, position, norm, ...)."""
    return st.sampled_from(get_args(literal))


_FLAGS = st.booleans()
SWITCHES: dict[str, st.SearchStrategy] = {  # field -> values of a valid type and range (vocab-sized ids aside)
    "kind": choices(fk_config.Kind), "position": choices(fk_config.Position), "norm": choices(fk_config.Norm),
    "norm_placement": choices(fk_config.NormPlacement), "activation": choices(fk_config.Activation),
    "head": choices(fk_config.Head), "pooling": choices(fk_config.Pooling),
    "attn_backend": choices(fk_config.AttnBackend),
    "attn_type": choices(fk_config.AttnType), "linear_feature": choices(fk_config.LinearFeature),
    "attn_gate": _FLAGS, "lowrank_k": st.integers(1, 8),
    "clip_gamma": st.floats(-0.1, 0.0), "clip_zeta": st.floats(1.0, 1.1),
    "exit_layers": st.none() | st.just([0]), "exit_head": choices(fk_config.ExitHead),
    "gated": _FLAGS, "qkv_bias": _FLAGS, "out_bias": _FLAGS, "mlp_bias": _FLAGS, "norm_bias": _FLAGS,
    "final_norm": _FLAGS, "tie_embeddings": _FLAGS, "parallel_block": _FLAGS, "qk_norm": _FLAGS,
    "embed_scale": _FLAGS, "embed_norm": _FLAGS, "pooler": _FLAGS, "lm_head_bias": _FLAGS, "lm_head_scale": _FLAGS,
    "n_decoder_layers": st.none() | st.integers(1, 2),
    "sliding_window": st.none() | st.integers(1, 8),
    "attn_scale": st.none() | st.floats(0.05, 2.0),
    "rope_theta": st.floats(10.0, 1e6),
    "rotary_fraction": st.sampled_from([0.25, 0.5, 1.0]),
    "position_offset": st.integers(0, 2),
    "relative_buckets": st.integers(4, 16),
    "relative_max_distance": st.integers(4, 64),
    "norm_eps": st.floats(1e-12, 1e-3),
    "type_vocab_size": st.integers(0, 3),
    "num_labels": st.integers(1, 4),
    "init_std": st.floats(0.01, 0.5),
    "attn_dropout": st.floats(0.0, 0.5), "resid_dropout": st.floats(0.0, 0.5), "embed_dropout": st.floats(0.0, 0.5),
    "n_experts": st.integers(0, 3), "experts_per_token": st.integers(1, 2), "moe_d_ff": st.none() | st.integers(1, 16),
    "moe_renormalize": _FLAGS, "shared_expert_d_ff": st.integers(0, 8), "moe_layer_step": st.integers(1, 2),
    "capacity_factor": st.none() | st.floats(0.25, 2.0),
}
# the decoder's own sizes, drawn only for an encoder-decoder (other kinds refuse them): field -> values
DECODER_SIZES: dict[str, st.SearchStrategy] = {
    "decoder_n_heads": st.sampled_from([1, 2, 4]), "decoder_n_kv_heads": st.sampled_from([1, 2]),
    "decoder_d_ff": st.integers(1, 32),
}
# the switches a Hugging Face family can hold for some preset: configs drawn with only these often translate
HF_SWITCHES = ("activation", "head", "pooler", "tie_embeddings", "qkv_bias", "out_bias", "mlp_bias", "qk_norm",
               "sliding_window", "rope_theta", "norm_eps", "num_labels", "n_decoder_layers", "gated",
               "decoder_n_heads", "decoder_d_ff", "n_experts", "experts_per_token", "moe_renormalize",
               "shared_expert_d_ff")


@st.composite
def config_overrides(draw: st.DrawFn, switches: tuple[str, ...] = (*SWITCHES, *DECODER_SIZES)
                     ) -> tuple[str, dict[str, Any]]:
    """A preset name and overrides for it: tiny sizes, and a random subset of ``switches`` (see SWITCHES).

    The values are each of a valid type and range; combinations may still be invalid (an encoder
    with an 'lm' head, RoPE with an odd head size, ...), which ModelConfig must reject. The
    decoder's own sizes (DECODER_SIZES) are drawn only for an encoder-decoder.
    """
    preset = draw(st.sampled_from(TEXT_PRESETS + IMAGE_PRESETS))
    n_heads = draw(st.sampled_from([1, 2, 4]))
    d_head = draw(st.none() | st.sampled_from([2, 3, 4, 8]))
    d_model = n_heads * draw(st.sampled_from([2, 4, 8])) if d_head is None else draw(st.integers(2, 24))
    vocab = draw(st.integers(8, 48))
    sizes = dict(n_layers=draw(st.integers(1, 2)), n_heads=n_heads, d_head=d_head, d_model=d_model,
                 n_kv_heads=draw(st.none() | st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0])),
                 d_ff=draw(st.integers(1, 32)), vocab_size=vocab, max_seq_len=draw(st.integers(8, 24)))
    if preset in IMAGE_PRESETS:
        image, patch = draw(st.sampled_from([(4, 1), (4, 2), (8, 2), (8, 4), (6, 3)]))
        sizes.update(image_size=image, patch_size=patch, num_channels=draw(st.integers(1, 3)),
                     max_seq_len=(image // patch) ** 2 + draw(st.integers(1, 3)))
    ids = {"pad_token_id": st.none() | st.integers(0, vocab - 1),
           "decoder_start_token_id": st.none() | st.integers(0, vocab - 1)}
    chosen = draw(st.fixed_dictionaries({}, optional={**{k: SWITCHES[k] for k in switches if k in SWITCHES}, **ids}))
    if chosen.get("kind", PRESETS[preset]["kind"]) == "encoder-decoder":
        chosen.update(draw(st.fixed_dictionaries({}, optional={k: DECODER_SIZES[k] for k in switches
                                                                if k in DECODER_SIZES})))
    return preset, {**sizes, **chosen}


def build_config(preset: str, overrides: dict[str, Any]) -> fk.ModelConfig | None:
    """``ModelConfig.from_preset(preset, **overrides)``, or None when it raises ConfigError."""
    try:
        return fk.ModelConfig.from_preset(preset, **overrides)
    except fk.ConfigError:
        return None


def valid_configs(switches: tuple[str, ...] = (*SWITCHES, *DECODER_SIZES)) -> st.SearchStrategy[fk.ModelConfig]:
    """Tiny configs that ModelConfig accepts, drawn by ``config_overrides(switches)``."""
    return config_overrides(switches).map(lambda drawn: build_config(*drawn)).filter(lambda cfg: cfg is not None)


@st.composite
def ids_and_mask(draw: st.DrawFn, cfg: fk.ModelConfig, min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) in the vocabulary and a mask (B, T) padded on the right, each row >= min_length tokens."""
    b = draw(st.integers(1, 3))
    t = draw(st.integers(min_length, min(cfg.max_seq_len, 10)))
    ids = draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=b * t, max_size=b * t))
    lengths = draw(st.lists(st.integers(min_length, t), min_size=b, max_size=b))
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    return torch.tensor(ids).view(b, t), mask


@st.composite
def training_inputs(draw: st.DrawFn, cfg: fk.ModelConfig) -> dict[str, torch.Tensor]:
    """Keyword arguments of one training forward pass of a model of ``cfg``: inputs and labels for its head.

    Every row has a label to predict (a causal LM: a real token after the first).
    """
    if cfg.patch_size is not None:
        b = draw(st.integers(1, 3))
        seed = draw(st.integers(0, 2**16))
        pixels = torch.randn(b, cfg.num_channels, cfg.image_size, cfg.image_size,
                             generator=torch.Generator().manual_seed(seed))
        labels = torch.tensor(draw(st.lists(st.integers(0, cfg.num_labels - 1), min_size=b, max_size=b)))
        return {"pixel_values": pixels, **({"labels": labels} if cfg.head == "classifier" else {})}
    causal_lm = cfg.kind == "decoder" and cfg.head == "lm"
    ids, mask = draw(ids_and_mask(cfg, min_length=2 if causal_lm else 1))  # a causal LM needs a next token
    inputs = {"input_ids": ids, "attention_mask": mask}
    if cfg.kind == "encoder-decoder":
        target = draw(st.integers(1, min(cfg.max_seq_len, 8)))
        tgt = torch.tensor(draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=ids.shape[0] * target,
                                         max_size=ids.shape[0] * target))).view(ids.shape[0], target)
        inputs["decoder_input_ids"] = tgt
        if cfg.head == "lm":
            inputs["labels"] = tgt.roll(-1, 1)
    elif cfg.head in ("lm", "mlm"):
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    if cfg.head == "classifier":
        inputs["labels"] = torch.tensor(draw(st.lists(st.integers(0, cfg.num_labels - 1), min_size=ids.shape[0],
                                                      max_size=ids.shape[0])))
    if cfg.type_vocab_size and draw(st.booleans()):
        inputs["token_type_ids"] = torch.randint(0, cfg.type_vocab_size, ids.shape,
                                                 generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return inputs
