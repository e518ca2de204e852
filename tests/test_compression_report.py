"""Smoke test of benchmarks/compression.py (the one-run compression report) on tiny models, so it cannot rot."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

import formerkit as fk
from conftest import load_script

bench = load_script("benchmarks/compression.py")
MODELS = ("demo", "gpt2-base (random init)")


@pytest.fixture(scope="module")
def report():
    """One quick run (one thread: tiny models are fastest so on a shared CPU) and what it printed."""
    threads, printed = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            out = bench.main(["--quick", "--train-steps", "12", "--distill-steps", "4", "--repeats", "1",
                              "--load-repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    return out, printed.getvalue()


def by_variant(out: dict, model: str) -> dict[str, dict]:
    return {r["variant"]: r for r in out["rows"] if r["model"] == model}


def test_table_has_every_row_and_column(report):
    out, text = report
    assert [(r["model"], r["variant"]) for r in out["rows"]] == [(m, v) for m in MODELS for v in bench.VARIANTS]
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    for column in ("parameters", "size on disk", "load s", "decode tok/s", "perplexity"):
        assert column in header
    table = [line for line in text.splitlines() if line.startswith("| demo |") or line.startswith("| gpt2-base")]
    assert len(table) == len(MODELS) * len(bench.VARIANTS)
    assert "int4 (g32)" in text  # the demo shape's d_ff admits groups of 32 only at this size
    assert f"CPU: {out['cpu']}" in text and out["cpu"]


@pytest.mark.parametrize("model", MODELS)
def test_numbers_are_sane(report, model):
    rows = by_variant(report[0], model)
    fp32 = rows["fp32"]
    for r in rows.values():
        assert r["bytes"] > 0 and r["load_s"] > 0 and r["tokens_per_s"] > 0
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    assert rows["int4"]["bytes"] < rows["int8"]["bytes"] < fp32["bytes"]
    assert rows["bf16"]["bytes"] < 0.6 * fp32["bytes"]
    for variant in ("bf16", "int8", "int4"):  # same weights, fewer bits: perplexity barely moves
        assert rows[variant]["params"] == fp32["params"]
        assert rows[variant]["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.05)
    assert rows["pruned 50%"]["params"] < rows["pruned 25%"]["params"] < fp32["params"]
    assert rows["distilled"]["params"] <= 0.5 * fp32["params"]


def test_trained_demo_model_beats_uniform_guessing(report):
    rows = by_variant(report[0], "demo")
    assert rows["fp32"]["perplexity"] < 256  # the byte tokenizer's alphabet: a uniform guess scores more


def test_int4_group_is_the_largest_that_divides_every_input_width():
    def model(d_model: int, d_ff: int) -> fk.Transformer:
        return fk.Transformer(fk.ModelConfig.from_preset("llama", n_layers=1, d_model=d_model, n_heads=2,
                                                         d_ff=d_ff, vocab_size=64, max_seq_len=8))

    assert bench.int4_group(model(128, 352)) == 32  # examples/demo.yaml's widths
    assert bench.int4_group(model(128, 192)) == 64
    assert bench.int4_group(model(128, 256)) == 128
