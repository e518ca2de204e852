"""The shared test helpers of conftest.py: required references in CI, re-initialisation and error for parity tests."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import settings

import formerkit as fk
from conftest import PARITY_STD, in_ci, parity_error, reinit_for_parity, require

MISSING = "formerkit_no_such_reference_library"


def test_require_returns_the_module():
    assert require("json") is json


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_a_missing_reference_fails_in_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match=f'{MISSING} is required in CI.*pip install -e ".\\[test\\]"'):
        require(MISSING)


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_reference_skips_outside_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} is not installed"):
        require(MISSING)


def test_reinit_for_parity_spreads_weights_and_keeps_norms_near_one():
    model = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=64, n_heads=4, d_ff=128,
                                                      vocab_size=300, max_seq_len=32))
    assert model.lm_head.proj.weight is model.tok_embed.weight
    reinit_for_parity(model)
    assert model.lm_head.proj.weight is model.tok_embed.weight  # tied weights stay tied
    for name, param in model.named_parameters():
        param = param.detach()
        if ".ln" in f".{name}" and name.endswith("weight"):  # ln1, ln2, ln_final
            assert abs(float(param.mean()) - 1) < 0.15 and abs(float(param.std()) - PARITY_STD) < 0.1, name
        else:  # weights and biases alike, norm biases included
            assert abs(float(param.mean())) < 0.15 and abs(float(param.std()) - PARITY_STD) < 0.1, name
    again = reinit_for_parity(fk.Transformer(model.config))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))  # seeded


def test_parity_error_is_relative_to_the_reference_magnitude_at_valid_positions():
    reference = torch.tensor([[10.0, -20.0], [0.5, 1000.0]])
    ours = reference + torch.tensor([[0.001, 0.0], [0.0, 5.0]])
    assert parity_error(ours, reference) == pytest.approx(5.0 / 1000.0)
    valid = torch.tensor([True, False])  # the second row is padding
    assert parity_error(ours, reference, valid) == pytest.approx(0.001 / 20.0, rel=1e-3)
    small = torch.tensor([0.01, -0.02])
    assert parity_error(small + 1e-3, small) == pytest.approx(1e-3, rel=1e-3)  # below magnitude 1: compared absolutely


def test_fuzz_examples_are_reproducible_in_ci():
    assert settings.get_profile("ci").derandomize
    assert settings.get_current_profile_name() == ("ci" if in_ci() else "dev")
