"""Fuzzing ModelConfig: valid configs build models that train, round-trip through JSON and Hugging Face
config.json, and invalid values raise ConfigError (never a TypeError, ValueError or AssertionError)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formerkit as fk
from fuzz_strategies import HF_SWITCHES, build_config, config_overrides, training_inputs, valid_configs

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                      HealthCheck.too_slow])
FIELDS = [f.name for f in dataclasses.fields(fk.ModelConfig)]
FLOAT_FIELDS = ["rope_theta", "rotary_fraction", "norm_eps", "attn_scale", "attn_dropout", "resid_dropout",
                "embed_dropout", "init_std"]
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2),
                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                 st.sampled_from(["gelu", "rope", "decoder", "lm", "mean", "pre", "sdpa", "rmsnorm"]))


def hf_round_trip(cfg: fk.ModelConfig) -> tuple[dict[str, Any], fk.ModelConfig] | None:
    """cfg's Hugging Face config.json dict and the config read back from it; None when no HF family holds cfg.

    The one place that names the translation API (today ModelConfig.to_hf / from_hf): when it moves to
    functions of formerkit.checkpoints.hf_config, only these two calls change.
    """
    try:
        hf = fk.config_to_hf(cfg)
    except fk.ConfigError:
        return None
    return hf, fk.config_from_hf(hf)


def _model(cfg: fk.ModelConfig) -> fk.Transformer:
    torch.manual_seed(0)
    return fk.Transformer(cfg)


def _outputs(model: fk.Transformer, inputs: dict[str, torch.Tensor]) -> fk.ModelOutput:
    """Eval-mode forward pass without labels."""
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in inputs.items() if k != "labels"})


@FUZZ
@given(valid_configs(), st.data())
def test_valid_configs_train(one_thread, cfg, data):
    """Forward and backward in training mode on random inputs: a finite loss and finite gradients."""
    model = _model(cfg).train()
    inputs = data.draw(training_inputs(cfg))
    out = model(**inputs)
    loss = out.loss if out.loss is not None else out.hidden_states.pow(2).mean()
    assert out.loss is not None or cfg.head == "none"
    assert torch.isfinite(loss), cfg
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(p.grad is not None for p in model.parameters())


@FUZZ
@given(valid_configs() | valid_configs(HF_SWITCHES), st.data())
def test_valid_configs_round_trip(one_thread, cfg, data):
    """JSON gives the same config back; a Hugging Face config.json gives a config of the same model."""
    assert fk.ModelConfig.from_json(cfg.to_json()) == cfg
    assert fk.ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace() == cfg
    translated = hf_round_trip(cfg)
    if translated is None:
        return
    hf, again = translated
    second = hf_round_trip(again)
    assert second is not None and second[0] == hf  # stable: the second translation writes the same config.json
    model, copy = _model(cfg), _model(again)
    state = model.state_dict()
    assert {k: v.shape for k, v in copy.state_dict().items()} == {k: v.shape for k, v in state.items()}
    copy.load_state_dict(state)
    inputs = data.draw(training_inputs(cfg))
    ours, theirs = _outputs(model, inputs), _outputs(copy, inputs)
    for a, b in [(ours.logits, theirs.logits), (ours.hidden_states, theirs.hidden_states)]:
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@FUZZ
@given(config_overrides(), st.dictionaries(st.sampled_from(FIELDS + ["d_modle", "layers"]), JUNK, min_size=1,
                                           max_size=3), st.data())
def test_any_values_raise_config_error_or_build(one_thread, drawn, junk, data):
    """Whatever the values, ModelConfig raises ConfigError or gives a config (of finite numbers) whose model runs."""
    preset, overrides = drawn
    cfg = build_config(preset, {**overrides, **junk})
    if cfg is None:
        return
    for name in FLOAT_FIELDS:
        value = getattr(cfg, name)
        assert value is None or math.isfinite(value), f"{name}={value} was accepted"
    model = _model(cfg).train()
    out = model(**data.draw(training_inputs(cfg)))
    (out.loss if out.loss is not None else out.hidden_states.sum()).backward()


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_rejected(name, value):
    with pytest.raises(fk.ConfigError, match=name):
        fk.ModelConfig.from_preset("llama", n_layers=1, d_model=16, n_heads=2, **{name: value})


# ---- what the fuzzing found, kept as plain regression tests ------------------------------------------------------

@pytest.mark.parametrize("preset, kw", [
    ("gpt2", {"pooler": True}),  # GPT-2's layout has no pooler: the weights were silently dropped
    ("llama", {"pooler": True}),
    ("bart-base", {"pooler": True}),
    ("bert-base", {"head": "none", "pooler": False}),  # BertModel carries a pooler: transformers would invent one
    ("bert-base", {"head": "mlm", "pooler": True}),  # BertForMaskedLM has none
])
def test_poolers_that_the_hf_layout_cannot_hold_are_refused(preset, kw, tmp_path):
    cfg = fk.ModelConfig.from_preset(preset, n_layers=1, d_model=8, n_heads=2, d_ff=8, vocab_size=16, **kw)
    assert hf_round_trip(cfg) is None
    with pytest.raises(fk.ConfigError, match=r"pooler=.*format='native'"):
        fk.save_pretrained(fk.Transformer(cfg), tmp_path, format="hf")


def test_t5_without_a_decoder_start_token_writes_its_pad_id():
    """A null decoder_start_token_id was read back as the pad id, so a second translation differed from the first."""
    for pad in (None, 3):
        cfg = fk.ModelConfig.from_preset("t5-small", n_layers=1, d_model=8, n_heads=2, d_head=4, d_ff=8,
                                         vocab_size=16, decoder_start_token_id=None, pad_token_id=pad)
        hf, again = hf_round_trip(cfg)
        assert hf["decoder_start_token_id"] == again.decoder_start_token_id == (pad or 0)
        assert hf_round_trip(again)[0] == hf
