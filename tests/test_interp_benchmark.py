"""Smoke test of benchmarks/interp.py on a tiny model, so the benchmark cannot rot."""

from __future__ import annotations

import pytest

from conftest import load_script, require

require("transformers")
require("transformer_lens")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/interp.py")


def test_tiny_run_measures_everything_and_agrees_with_transformerlens(bench, capsys):
    out = bench.main(["--shape", "tiny", "--repeats", "1", "--batch-size", "3"])
    assert out["cells"] == 2 * 4 and out["max_diff"] < 1e-5 and out["tl_max_diff"] < 1e-4
    assert out["resid_post_diff"] < 1e-4
    for key in ("fk_forward_s", "fk_bare_forward_s", "hf_forward_s", "tl_forward_s", "fk_cache_s", "tl_cache_s",
                "fk_resid_s", "tl_resid_s", "fk_sweep_s", "naive_sweep_s", "tl_sweep_s", "fk_cache_bytes",
                "tl_cache_bytes", "fk_cache_held", "tl_cache_held", "fk_cache_peak", "tl_cache_peak"):
        assert out[key] > 0, key
    text = capsys.readouterr().out
    assert "threads" in text and text.count("target ") == 4
