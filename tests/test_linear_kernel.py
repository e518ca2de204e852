"""The few-row CPU kernel of ``Linear``: the split product equals F.linear, the probe decides, forward follows it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import formerkit as fk
from formerkit.layers import linear
from formerkit.layers.linear import FEW_ROWS, Linear, split_linear, tune_linears


@pytest.fixture
def table(monkeypatch):
    """An empty table of choices for the test (the process's own is left as it was), on 2 threads."""
    monkeypatch.setattr(linear, "_SPLITS", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield linear._SPLITS
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_split_product_equals_f_linear(dtype, rows, transposed, bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=g).to(dtype)  # (out, in)
    if transposed:  # a GPT-2 Conv1D weight loaded in place: (in, out) storage seen as (out, in)
        weight = weight.t().contiguous().t()
    b = torch.randn(24, generator=g).to(dtype) if bias else None
    x = torch.randn(2, rows, 40, generator=g).to(dtype)[:1]  # (1, rows, in)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for slices in (2, 3, 4):
        torch.testing.assert_close(split_linear(x, weight, b, slices), F.linear(x, weight, b), **tol)


def _model() -> fk.Transformer:
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                     vocab_size=64, max_seq_len=64)
    return fk.Transformer(cfg).eval()


@pytest.mark.parametrize("split_faster", [True, False])
def test_the_probe_keeps_the_split_only_when_it_is_faster(table, monkeypatch, split_faster):
    timings = {1: 1.0, 2: 0.5 if split_faster else 0.95}  # slices -> seconds per pass (0.95: under MIN_GAIN)
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, slices, dtype: timings[slices])
    choices = tune_linears(_model())
    expected = 2 if split_faster else 1
    assert choices == {(torch.float32, 1, 2): expected, (torch.float32, FEW_ROWS, 2): expected}
    monkeypatch.setattr(linear, "_pass_seconds", lambda *a: pytest.fail("measured twice"))
    assert tune_linears(_model()) == choices  # once per process, dtype and thread count


def test_forward_follows_the_table_only_for_few_rows_without_autograd(table, monkeypatch):
    calls = []
    monkeypatch.setattr(linear, "split_linear", lambda *a: calls.append(a[3]) or F.linear(*a[:3]))
    layer = Linear(8, 6)
    table[torch.float32, 1, 2] = 2
    table[torch.float32, FEW_ROWS, 2] = 1
    with torch.no_grad():
        layer(torch.randn(1, 1, 8))  # one row: split in 2
        layer(torch.randn(1, 4, 8))  # few rows: F.linear, as chosen
        layer(torch.randn(1, FEW_ROWS + 1, 8))  # many rows: always F.linear
        Linear(8, 6).double()(torch.randn(1, 1, 8, dtype=torch.float64))  # a dtype not measured
    layer(torch.randn(1, 1, 8))  # autograd on: F.linear
    assert calls == [2]


def test_greedy_tokens_are_the_same_with_the_split_kernel(table, monkeypatch):
    model, prompt = _model(), torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, slices, dtype: 1.0 if slices == 1 else 0.1)
    split = fk.generate(model, prompt, max_new_tokens=12)
    assert table[torch.float32, 1, 2] == 2
    table.clear()
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, slices, dtype: 1.0)
    plain = fk.generate(model, prompt, max_new_tokens=12)
    assert table[torch.float32, 1, 2] == 1
    assert torch.equal(split, plain)


def test_the_probe_measures_nothing_on_one_thread(monkeypatch):
    monkeypatch.setattr(linear, "_SPLITS", {})
    monkeypatch.setattr(linear, "_pass_seconds", lambda *a: pytest.fail("measured on one thread"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tune_linears(_model()) == {}
    finally:
        torch.set_num_threads(threads)
