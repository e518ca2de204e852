"""Smoke test of benchmarks/interp.py on a tiny model, so the benchmark cannot rot."""

from __future__ import annotations

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/interp.py")


def test_tiny_sweep_agrees_with_the_naive_loop(bench, capsys):
    out = bench.main(["--shape", "tiny", "--repeats", "1", "--batch-size", "3"])
    assert out["cells"] == 2 * 4 and out["max_diff"] < 1e-5
    assert out["batched_s"] > 0 and out["naive_s"] > 0
    text = capsys.readouterr().out
    assert "speedup" in text and "threads" in text
