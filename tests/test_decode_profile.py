"""Smoke test of benchmarks/decode_profile.py on a tiny Llama shape, so the profile cannot rot."""

from __future__ import annotations

import pytest

from conftest import load_script, require

require("transformers")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/decode_profile.py")


def test_categories_of_operators(bench):
    assert bench.category("aten::bmm") == "weight products"
    assert bench.category("aten::_weight_int8pack_mm") == "weight products"
    assert bench.category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bench.category("aten::mul") == "other ops"


def test_tiny_profile_accounts_for_the_whole_step(bench, capsys):
    out = bench.main(["--model", "llama-tiny", "--precisions", "fp32,int8", "--new-tokens", "6", "--repeats", "1"])
    assert set(out) == {"fp32", "int8"}
    for row in out.values():
        assert sum(row[c] for c in bench.CATEGORIES) == pytest.approx(1.0, abs=1e-6)
        assert row["weight products"] > 0 and row["op calls per token"] > 0 and row["bound_ms"] > 0
    assert any(name == "aten::_weight_int8pack_mm" for name, _ in out["int8"]["top"])
    assert "| fp32 |" in capsys.readouterr().out
