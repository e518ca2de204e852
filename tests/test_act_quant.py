"""Activation outliers and simulated int8 activation quantisation, against brute-force recomputation."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from formerkit.compress.act_quant import (
    activation_outliers,
    calibrate_activation_ranges,
    fake_quantize,
    kurtosis,
    quantized_activations,
)


def _model(**kw) -> fk.Transformer:
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                                                     d_ff=48, vocab_size=64, max_seq_len=32, **kw)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)]


def test_kurtosis_is_the_fourth_standardised_moment():
    x = torch.randn(5, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, std = x.mean(-1, keepdim=True), x.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(kurtosis(x), (((x - mean) / std) ** 4).mean(-1))
    assert kurtosis(torch.tensor([[0.0, 0.0, 0.0, 10.0]])) > kurtosis(torch.tensor([[1.0, -1.0, 1.0, -1.0]]))


def test_outliers_are_read_from_every_block_output():
    model, batches = _model(), _batches()
    outputs = []
    handles = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in model.blocks]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    stats = activation_outliers(model, batches)
    assert stats["max_inf_norm"] == pytest.approx(max(float(o.abs().max()) for o in outputs))
    per_layer = [torch.cat([kurtosis(o).flatten() for o in outputs[i::2]]).mean() for i in range(2)]
    assert stats["mean_kurtosis"] == pytest.approx(float(sum(per_layer) / 2), rel=1e-5)
    assert stats["max_layer_kurtosis"] == pytest.approx(float(max(per_layer)), rel=1e-5)


def test_fake_quantize_rounds_to_the_int8_grid():
    x = torch.tensor([-3.0, -0.011, 0.0, 0.5, 2.0, 9.0])
    q = fake_quantize(x, 2.54)  # scale 0.02
    torch.testing.assert_close(q, torch.tensor([-2.54, -0.02, 0.0, 0.5, 2.0, 2.54]))


def test_quantized_activations_round_each_linear_input_on_its_calibrated_range():
    model, batches = _model(), _batches()
    ranges = calibrate_activation_ranges(model, batches)
    assert set(ranges) == {f"blocks.{i}.{n}" for i in range(2)
                           for n in ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_gate", "mlp.fc_out")}
    seen = {}
    with torch.no_grad(), quantized_activations(model, ranges):  # a hook added after the quantizer's sees its output
        hook = model.blocks[1].mlp.fc_out.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        quantized = model(batches[0]).logits
    hook.remove()
    x = seen["x"]  # what fc_out received: on the grid of its range
    scale = ranges["blocks.1.mlp.fc_out"] / 127
    torch.testing.assert_close(x, (x / scale).round() * scale)
    with torch.no_grad():
        plain = model(batches[0]).logits  # the hooks are gone afterwards
    assert not torch.equal(plain, quantized) and (plain - quantized).abs().max() < 0.5
    with pytest.raises(ValueError, match="calibrate"):
        with quantized_activations(model, {"blocks.9.attn.qkv": 1.0}):
            pass


def test_quantized_activations_work_on_int8_weights():
    model, batches = _model(), _batches()
    fk.quantize_int8(model)
    ranges = calibrate_activation_ranges(model, batches)
    with torch.no_grad(), quantized_activations(model, ranges):
        assert torch.isfinite(model(batches[0]).logits).all()
    assert len(ranges) == 10
