"""ModelConfig: validation messages, presets, JSON round trips and derived sizes."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit as fk
from formerkit.presets import PRESETS

SMALL = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16)


def small(**changes) -> fk.ModelConfig:
    return fk.ModelConfig(**{**SMALL, **changes})


def raises(match: str, **changes) -> str:
    """Build a small config with ``changes``; require a ConfigError whose message matches."""
    with pytest.raises(fk.ConfigError, match=match) as info:
        small(**changes)
    return str(info.value)


# ---- head sizes --------------------------------------------------------------------


def test_d_model_not_divisible_by_n_heads():
    msg = raises(r"d_model=30 is not divisible by n_heads=4", d_model=30)
    assert "d_head" in msg  # tells the user how to fix it


def test_explicit_d_head_fixes_indivisible_d_model():
    cfg = small(d_model=30, d_head=8)
    assert cfg.head_dim == 8
    model = fk.Transformer(cfg)
    assert model.blocks[0].attn.qkv.out_features == 3 * 4 * 8
    assert model.blocks[0].attn.out.in_features == 4 * 8


def test_n_heads_not_multiple_of_n_kv_heads():
    msg = raises(r"n_heads=4 is not a multiple of n_kv_heads=3", n_kv_heads=3)
    assert "MQA" in msg
    raises(r"n_heads=4 is not a multiple of n_kv_heads=8", n_kv_heads=8)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_valid_kv_heads(kv):
    assert small(n_kv_heads=kv).kv_heads == kv


def test_rope_needs_even_head_dim():
    raises(r"RoPE needs an even head size, but d_head=7", position="rope", d_head=7)
    small(position="learned", d_head=7)  # odd heads are fine without RoPE


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_rotary_fraction_out_of_range(fraction):
    raises(r"rotary_fraction must be in \(0, 1\]", position="rope", rotary_fraction=fraction)


def test_rotary_fraction_rotating_odd_or_too_few_dims():
    # d_head 8: 0.1 rotates int(0.8)=0 dims, 0.375 rotates 3 dims.
    raises(r"rotates 0 dims; RoPE needs an even number >= 2", position="rope", rotary_fraction=0.1)
    raises(r"rotates 3 dims", position="rope", rotary_fraction=0.375)


def test_rope_theta_positive():
    raises(r"rope_theta must be positive", position="rope", rope_theta=0.0)


# ---- unknown keys and names ----------------------------------------------------------


def test_from_dict_unknown_key_suggests():
    with pytest.raises(fk.ConfigError, match=r'unknown config field "n_layer" \(did you mean "n_layers"\?\)'):
        fk.ModelConfig.from_dict({**SMALL, "n_layer": 2})


def test_from_dict_unknown_key_without_close_match_lists_fields():
    with pytest.raises(fk.ConfigError) as info:
        fk.ModelConfig.from_dict({"zzzzzz": 1})
    assert "did you mean" not in str(info.value)
    assert "valid fields:" in str(info.value) and "d_model" in str(info.value)


def test_from_preset_unknown_override_suggests():
    with pytest.raises(fk.ConfigError, match=r'"dmodel" \(did you mean "d_model"\?\)'):
        fk.ModelConfig.from_preset("gpt2", dmodel=64)


def test_replace_unknown_key_suggests():
    with pytest.raises(fk.ConfigError, match=r'"n_head" \(did you mean "n_heads"\?\)'):
        small().replace(n_head=2)


def test_replace_validates_and_leaves_original():
    cfg = small()
    new = cfg.replace(n_layers=2, position="rope")
    assert (new.n_layers, new.position) == (2, "rope")
    assert (cfg.n_layers, cfg.position) == (1, "learned")
    with pytest.raises(fk.ConfigError, match="n_heads=4 is not a multiple"):
        cfg.replace(n_kv_heads=3)


def test_unknown_preset_suggests():
    with pytest.raises(fk.ConfigError, match=r'unknown preset "gtp2" \(did you mean "gpt2"\?\)') as info:
        fk.ModelConfig.from_preset("gtp2")
    assert "llama" in str(info.value)  # lists the available presets


# ---- sizes, enums, dropout, heads --------------------------------------------------


@pytest.mark.parametrize("name", ["vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "num_labels"])
@pytest.mark.parametrize("value", [0, -3, True, None, 2.0, "8"])
def test_required_sizes_must_be_positive_ints(name, value):
    raises(rf"{name} must be a positive integer, got {value!r}", **{name: value})


@pytest.mark.parametrize("name", ["n_decoder_layers", "n_kv_heads", "d_head", "sliding_window", "decoder_n_heads",
                                  "decoder_n_kv_heads", "decoder_d_ff"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_optional_sizes_must_be_positive_ints_or_none(name, value):
    raises(rf"{name} must be a positive integer or null, got {value!r}", **{name: value})
    small(**{name: None})


@pytest.mark.parametrize("value", [-1, None, True, 1.5])
def test_type_vocab_size_must_be_non_negative_int(value):
    raises(r"type_vocab_size must be", type_vocab_size=value)


@pytest.mark.parametrize(
    "name, value, suggestion",
    [
        ("kind", "decoder-only", "decoder"),
        ("position", "rotary", None),
        ("position", "alibii", "alibi"),
        ("norm", "rms_norm", "rmsnorm"),
        ("norm_placement", "middle", None),
        ("activation", "gelu_new", "gelu_tanh"),
        ("head", "classifer", "classifier"),
        ("pooling", "average", None),
        ("attn_backend", "flash", None),
    ],
)
def test_bad_enumerated_values(name, value, suggestion):
    msg = raises(rf"{name}='{value}' is not supported", **{name: value})
    assert "choose one of" in msg
    if suggestion is not None:
        assert f'did you mean "{suggestion}"' in msg


@pytest.mark.parametrize("name", ["attn_dropout", "resid_dropout", "embed_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, None])
def test_dropout_out_of_range(name, value):
    raises(rf"{name} must be", **{name: value})


def test_dropout_in_range_accepted():
    cfg = small(attn_dropout=0.0, resid_dropout=0.5, embed_dropout=0.99)
    assert cfg.resid_dropout == 0.5


def test_other_positive_floats():
    raises(r"norm_eps must be positive", norm_eps=0.0)
    raises(r"attn_scale must be positive", attn_scale=-1.0)
    raises(r"attn_scale must be a number or null, got '1'", attn_scale="1")
    raises(r"norm_eps must be a number, got None", norm_eps=None)
    raises(r"rope_theta must be a number, got '1e4'", rope_theta="1e4")
    raises(r"rotary_fraction must be a number, got None", position="rope", rotary_fraction=None)
    raises(r"init_std must be a number, got True", init_std=True)


def test_mlm_head_on_decoder_rejected():
    msg = raises(r"head='mlm' needs kind='encoder', got kind='decoder'", head="mlm")
    assert "head='lm'" in msg
    raises(r"head='mlm' needs kind='encoder'", head="mlm", kind="encoder-decoder")


def test_lm_head_on_encoder_rejected():
    raises(r"encoder-only model cannot have a causal 'lm' head", kind="encoder", head="lm")


def test_other_cross_field_rules():
    raises(r"parallel_block=True needs norm_placement='pre'", parallel_block=True, norm_placement="post")
    raises(r"pad_token_id=64 is outside the vocabulary \[0, 64\)", pad_token_id=64)
    raises(r"pad_token_id must be an integer or null, got True", pad_token_id=True)
    raises(r"init_std must be positive, got -0.1", init_std=-0.1)
    raises(r"type_vocab_size applies to single-stack models", kind="encoder-decoder", type_vocab_size=2)
    raises(r"sinusoidal positions need an even d_model, got 35", position="sinusoidal", d_model=35, n_heads=5)
    assert small(position="learned", d_model=35, n_heads=5).head_dim == 7


# ---- presets ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    cfg = fk.ModelConfig.from_preset(name)
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value
    if cfg.d_head is None:  # an explicit d_head may differ (T5 v1.1: 6 heads of 64 in d_model 512)
        assert cfg.head_dim * cfg.n_heads == cfg.d_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_overrides_build_a_tiny_model(name):
    images = {"image_size": 8, "patch_size": 4, "num_channels": 1} if PRESETS[name].get("patch_size") else {}
    cfg = fk.ModelConfig.from_preset(name, n_layers=1, d_model=32, n_heads=4, d_ff=64, vocab_size=50,
                                     max_seq_len=16, n_kv_heads=None, **images)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size) == (1, 32, 4, 50)
    for key, value in PRESETS[name].items():  # everything not overridden is kept
        if key not in {"n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_seq_len", "n_kv_heads", *images}:
            assert getattr(cfg, key) == value
    model = fk.Transformer(cfg).eval()
    ids = torch.randint(0, 50, (1, 5))
    kwargs = {"decoder_input_ids": ids} if cfg.kind == "encoder-decoder" else {}
    out = model(pixel_values=torch.rand(1, 1, 8, 8)) if images else model(ids, **kwargs)
    assert torch.isfinite(out.hidden_states).all()


def test_preset_facts():
    assert fk.ModelConfig.from_preset("llama").kv_heads == 2
    assert fk.ModelConfig.from_preset("gpt2").head_dim == 64
    assert fk.ModelConfig.from_preset("vaswani-base").decoder_layers == 6
    assert fk.ModelConfig.from_preset("bert-base").head == "mlm"


# ---- JSON --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip_string(name):
    cfg = fk.ModelConfig.from_preset(name, sliding_window=4, attn_scale=0.5)
    text = cfg.to_json()
    assert json.loads(text)["sliding_window"] == 4
    assert fk.ModelConfig.from_json(text) == cfg


def test_json_round_trip_file(tmp_path):
    cfg = small(kind="encoder-decoder", n_decoder_layers=2, position="rope", rotary_fraction=0.5, n_kv_heads=2)
    path = tmp_path / "config.json"
    text = cfg.to_json(path)
    assert path.read_text() == text
    assert fk.ModelConfig.from_json(path) == cfg
    assert fk.ModelConfig.from_json(str(path)) == cfg
    assert fk.ModelConfig.from_json(path) != cfg.replace(n_layers=2)


def test_from_json_errors(tmp_path):
    with pytest.raises(fk.ConfigError, match="does not exist"):
        fk.ModelConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(fk.ConfigError, match="not valid JSON"):
        fk.ModelConfig.from_json("{not json")
    with pytest.raises(fk.ConfigError, match=r'did you mean "d_model"'):
        fk.ModelConfig.from_json('{"d_modle": 32}')


# ---- derived sizes -------------------------------------------------------------------


def test_derived_properties_defaults():
    cfg = small()
    assert cfg.head_dim == 32 // 4
    assert cfg.kv_heads == 4
    assert cfg.decoder_layers == 1
    assert cfg.rotary_dim == 8


def test_derived_properties_explicit():
    cfg = small(kind="encoder-decoder", n_layers=2, n_decoder_layers=3, n_kv_heads=1, d_head=12,
                position="rope", rotary_fraction=0.5)
    assert cfg.head_dim == 12
    assert cfg.kv_heads == 1
    assert cfg.decoder_layers == 3
    assert cfg.rotary_dim == 6
    assert small(d_head=16, rotary_fraction=0.25, position="rope").rotary_dim == 4


@pytest.mark.parametrize("preset, d_model, d_ff", [("gpt2", 384, 1536), ("bert-base", 192, 768), ("llama", 256, 688),
                                                    ("t5-small", 256, 1024)])
def test_overriding_d_model_scales_d_ff_with_the_preset(preset, d_model, d_ff):
    assert fk.ModelConfig.from_preset(preset, d_model=d_model).d_ff == d_ff
    assert fk.ModelConfig.from_preset(preset, d_model=d_model, d_ff=100).d_ff == 100  # an explicit d_ff wins
    assert fk.ModelConfig.from_preset(preset).d_ff == PRESETS[preset]["d_ff"]


def test_scaled_gpt2_matches_transformers_default_inner_size():
    from transformers import GPT2Config

    ours = fk.ModelConfig.from_preset("gpt2", d_model=384, n_heads=6)
    theirs = GPT2Config(n_embd=384, n_head=6)  # n_inner=None: 4 * n_embd
    assert ours.d_ff == (theirs.n_inner or 4 * theirs.n_embd)
