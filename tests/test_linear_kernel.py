"""The few-row CPU kernels of ``Linear``: split and transposed products equal F.linear, the probe decides, forward
follows it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import formerkit as fk
from formerkit.layers import linear
from formerkit.layers.linear import BUCKETS, FEW_ROWS, Linear, split_linear, transposed_linear, tune_linears


@pytest.fixture
def table(monkeypatch):
    """An empty table of choices for the test (the process's own is left as it was), on 2 threads."""
    monkeypatch.setattr(linear, "_CHOICES", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield linear._CHOICES
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_split_and_transposed_products_equal_f_linear(dtype, rows, transposed, bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=g).to(dtype)  # (out, in)
    if transposed:  # a GPT-2 Conv1D weight loaded in place: (in, out) storage seen as (out, in)
        weight = weight.t().contiguous().t()
    b = torch.randn(24, generator=g).to(dtype) if bias else None
    x = torch.randn(2, rows, 40, generator=g).to(dtype)[:1]  # (1, rows, in)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for slices in (2, 3, 4):
        torch.testing.assert_close(split_linear(x, weight, b, slices), F.linear(x, weight, b), **tol)
    product = transposed_linear(x, weight, b)
    torch.testing.assert_close(product, F.linear(x, weight, b), **tol)
    assert product.is_contiguous() and product.shape == (1, rows, 24)


def _model() -> fk.Transformer:
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                     vocab_size=64, max_seq_len=64)
    return fk.Transformer(cfg).eval()


@pytest.mark.parametrize(("timings", "expected"), [
    ({"linear": 1.0, "split": 0.5, "transposed": 0.8}, dict.fromkeys(BUCKETS, "split")),
    ({"linear": 1.0, "split": 0.95, "transposed": 0.96}, dict.fromkeys(BUCKETS, "linear")),  # under MIN_GAIN
    ({"linear": 1.0, "split": 0.7, "transposed": 0.4}, dict.fromkeys(BUCKETS, "transposed")),
])
def test_the_probe_keeps_the_fastest_kernel_only_when_it_beats_f_linear(table, monkeypatch, timings, expected):
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, kernel, dtype: timings[kernel])
    choices = tune_linears(_model())
    assert choices == {(torch.float32, bucket, 2): kernel for bucket, kernel in expected.items()}
    monkeypatch.setattr(linear, "_pass_seconds", lambda *a: pytest.fail("measured twice"))
    assert tune_linears(_model()) == choices  # once per process, dtype and thread count
    monkeypatch.setattr(linear, "_pass_seconds", lambda *a: pytest.fail("measured twice"))
    assert tune_linears(_model()) == choices  # once per process, dtype and thread count


def test_forward_follows_the_table_only_for_few_rows_without_autograd(table, monkeypatch):
    calls = []
    monkeypatch.setattr(linear, "split_linear", lambda *a: calls.append(("split", a[3])) or F.linear(*a[:3]))
    monkeypatch.setattr(linear, "transposed_linear", lambda *a: calls.append(("transposed",)) or F.linear(*a))
    layer = Linear(8, 6)
    table[torch.float32, 1, 2] = "split"
    table[torch.float32, 4, 2] = "linear"
    table[torch.float32, FEW_ROWS, 2] = "linear"
    with torch.no_grad():
        layer(torch.randn(1, 1, 8))  # one row: split in 2
        layer(torch.randn(1, 4, 8))  # few rows: F.linear, as chosen
        layer(torch.randn(1, FEW_ROWS + 1, 8))  # many rows: always F.linear
        Linear(8, 6).double()(torch.randn(1, 1, 8, dtype=torch.float64))  # a dtype not measured
        Linear(8, 5)(torch.randn(1, 1, 8))  # 5 outputs cannot split in 2: F.linear
        table[torch.float32, FEW_ROWS, 2] = "transposed"
        layer(torch.randn(1, 5, 8))  # 5-16 rows: transposed, as chosen now
        layer(torch.randn(2, 2, 8))  # 2-4 rows: still F.linear
    layer(torch.randn(1, 1, 8))  # autograd on: F.linear
    assert calls == [("split", 2), ("transposed",)]


@pytest.mark.parametrize("kernel", ["split", "transposed"])
def test_greedy_tokens_are_the_same_with_either_kernel(table, monkeypatch, kernel):
    model, prompt = _model(), torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, k, dtype: 0.1 if k == kernel else 1.0)
    fast = fk.generate(model, prompt, max_new_tokens=12)
    assert table[torch.float32, 1, 2] == kernel and table[torch.float32, FEW_ROWS, 2] == kernel
    table.clear()
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, k, dtype: 1.0)
    plain = fk.generate(model, prompt, max_new_tokens=12)
    assert table[torch.float32, 1, 2] == "linear"
    assert torch.equal(fast, plain)


def test_on_one_thread_only_the_transposed_product_is_measured(monkeypatch):
    monkeypatch.setattr(linear, "_CHOICES", {})
    measured = []
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, k, dtype: measured.append(k) or 1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tune_linears(_model()) == {(torch.float32, bucket, 1): "linear" for bucket in BUCKETS}
    finally:
        torch.set_num_threads(threads)
    assert set(measured) == {"linear", "transposed"}


def test_without_layers_that_split_evenly_only_the_transposed_product_is_measured(monkeypatch):
    monkeypatch.setattr(linear, "_CHOICES", {})
    measured = []
    monkeypatch.setattr(linear, "_pass_seconds", lambda layers, rows, k, dtype: measured.append(k) or 1.0)
    model = _model()
    assert all(m.out_features % 3 for m in model.modules() if isinstance(m, Linear))  # none splits in 3
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        tune_linears(model)
    finally:
        torch.set_num_threads(threads)
    assert set(measured) == {"linear", "transposed"}
