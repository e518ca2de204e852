"""Weight-only int8 quantization: the math, model accuracy, hooks, save/load, generation, the CLI."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from torch import nn

import formerkit as fk
from formerkit.cache import KVCache
from formerkit.checkpoints.quantized import QUANTIZATION_FILE, load_quantized, save_quantized
from formerkit.generate.speculative import speculative_generate
from formerkit.layers.linear import Linear
from formerkit.layers.quantized import Int8Linear, quantize_int8, quantize_weight
from formerkit.quantize import add_quantize_command, weight_bytes

SMALL = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=96, max_seq_len=40)
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset: str = "gpt2", **kw) -> fk.Transformer:
    torch.manual_seed(0)
    if preset == "llama":
        kw.setdefault("n_kv_heads", 2)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **kw})).eval()


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_quantize_weight_matches_hand_computation():
    w = torch.tensor([[0.5, -1.27, 0.0], [2.54, 1.0, -0.3], [0.0, 0.0, 0.0]])
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.tolist() == [[50, -127, 0], [127, 50, -15], [0, 0, 0]]
    assert torch.allclose(scale, torch.tensor([0.01, 0.02, 0.0]))
    layer = Int8Linear.from_linear(nn.Linear(3, 3))
    with torch.no_grad():
        layer.weight.copy_(q)
        layer.scale.copy_(scale)
        layer.bias.copy_(torch.tensor([0.1, 0.0, -1.0]))
        y = layer(torch.tensor([[1.0, 2.0, 3.0]]))
    expected = [(50 - 254) * 0.01 + 0.1, (127 + 100 - 45) * 0.02, -1.0]
    assert torch.allclose(y[0], torch.tensor(expected), atol=1e-5)
    assert torch.allclose(layer.dequantize(), q.float() * scale[:, None])


@pytest.mark.parametrize("features", [(256, 384), (40, 7)])
def test_int8_linear_close_to_float(features):
    torch.manual_seed(0)
    linear = nn.Linear(*features)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 10, features[0])  # (B, T, in)
    with torch.no_grad():
        exact, approx = linear(x), layer(x)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    assert _relative_error(approx, exact) < 1e-2
    assert torch.allclose(approx, x @ layer.dequantize().T + linear.bias, atol=1e-5)


@pytest.mark.parametrize("in_features, rows, fused", [(64, 1, True), (64, 8, True), (64, 20, False), (40, 1, False)])
def test_bf16_input(monkeypatch, in_features, rows, fused):
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 48)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(rows, in_features)
    with torch.no_grad():
        y = layer(x.bfloat16())
        exact = x @ layer.dequantize().T + linear.bias
    assert y.dtype == torch.bfloat16 and bool(calls) == fused
    assert _relative_error(y, exact) < 2e-2


def test_bf16_input_not_aligned_for_the_fused_kernel():
    layer = Int8Linear.from_linear(nn.Linear(64, 32))
    flat = torch.randn(65, dtype=torch.bfloat16)
    x = flat[1:].view(1, 64)  # contiguous, but 2 bytes past an aligned address
    with torch.no_grad():
        y = layer(x)
    assert _relative_error(y, x.float() @ layer.dequantize().T + layer.bias) < 2e-2


@pytest.mark.parametrize("bad, message", [
    (torch.ones(2, 8, dtype=torch.long), "floating-point"),
    (torch.ones(2, 9), "8 features"),
    ([1.0] * 8, "floating-point"),
])
def test_int8_linear_rejects_bad_input(bad, message):
    with pytest.raises(fk.InputError, match=message):
        Int8Linear.from_linear(nn.Linear(8, 4))(bad)


def test_bad_arguments():
    with pytest.raises(fk.InputError, match="float matrix"):
        quantize_weight(torch.ones(3))
    with pytest.raises(fk.InputError, match="nn.Module"):
        quantize_int8("model")
    with pytest.raises(fk.InputError, match="quantize_int8"):
        save_quantized(_model(), "unused")


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_quantized_model_close_to_float(preset):
    model = _model(preset)
    quantized = quantize_int8(copy.deepcopy(model))
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert quantized.tok_embed.weight.dtype == torch.float32
    with torch.no_grad():
        assert _cosine(quantized(IDS).logits, model(IDS).logits) > 0.999


def test_tied_head_choices():
    model = _model("gpt2")
    assert model.lm_head.proj.weight is model.tok_embed.weight
    copied = quantize_int8(copy.deepcopy(model))
    assert isinstance(copied.lm_head.proj, Int8Linear)
    kept = quantize_int8(copy.deepcopy(model), quantize_tied_head=False)
    assert type(kept.lm_head.proj) is Linear and kept.lm_head.proj.weight is kept.tok_embed.weight
    assert isinstance(kept.blocks[0].attn.qkv, Int8Linear)
    float_bytes = weight_bytes(model)
    assert weight_bytes(kept) < weight_bytes(copied) < float_bytes
    with torch.no_grad():
        assert _cosine(kept(IDS).logits, model(IDS).logits) > 0.999


def test_names_and_hooks_survive():
    model = _model("llama")
    quantized = quantize_int8(copy.deepcopy(model))
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linear_names == {name for name, m in quantized.named_modules() if isinstance(m, Int8Linear)}
    assert set(quantized.state_dict()) == set(model.state_dict()) | {f"{n}.scale" for n in linear_names}
    seen = []
    quantized.blocks[1].mlp.hook_post.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    quantized.blocks[0].attn.hook_pattern.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        quantized(IDS)
    assert seen == [(2, 4, 12, 12), (2, 12, 128)]


@pytest.mark.parametrize("tied_head", [True, False])
def test_save_load_round_trip(tmp_path, tied_head):
    quantized = quantize_int8(_model("gpt2"), quantize_tied_head=tied_head)
    out = save_quantized(quantized, tmp_path / "q")
    assert json.loads((out / QUANTIZATION_FILE).read_text())["quantize_tied_head"] is tied_head
    loaded = load_quantized(out)
    assert isinstance(loaded.blocks[0].mlp.fc_in, Int8Linear) and loaded.blocks[0].mlp.fc_in.weight.dtype == torch.int8
    assert isinstance(loaded.lm_head.proj, Int8Linear) is tied_head
    int8 = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert all(m.weight.data_ptr() % 64 == 0 for m in int8)  # aligned for the fused kernel, not at file offsets
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, quantized(IDS).logits)
    with pytest.raises(fk.CheckpointError, match="not a quantized checkpoint"):
        load_quantized(fk.save_pretrained(_model(), tmp_path / "float"))


@torch.no_grad()
def test_generation_with_kv_cache():
    model = quantize_int8(_model("llama"))
    ids = IDS[:1]  # (1, 12)
    cache = KVCache.for_model(model, 1, 20)
    steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - model(ids).logits).abs().max() < 1e-4


def test_quantized_draft_for_speculative_decoding():
    target = _model("gpt2")
    draft = quantize_int8(copy.deepcopy(target))
    out = speculative_generate(target, draft, IDS[:1, :4], max_new_tokens=16, num_draft_tokens=4)
    ids = IDS[:1, :4]
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, target(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out.sequences, ids)
    assert out.acceptance_rate > 0.8


def test_bf16_model():
    model = _model("llama")
    quantized = quantize_int8(copy.deepcopy(model)).to(torch.bfloat16)
    assert quantized.blocks[0].attn.qkv.weight.dtype == torch.int8
    with torch.no_grad():
        logits = quantized(IDS[:1, :1]).logits  # one row: the fused kernel
        assert logits.dtype == torch.bfloat16
        assert _cosine(logits, model(IDS[:1, :1]).logits) > 0.99
        assert _cosine(quantized(IDS).logits, model(IDS).logits) > 0.99


def test_quantize_command(tmp_path, capsys):
    model = _model("gpt2", vocab_size=259)
    source = fk.save_pretrained(model, tmp_path / "float")
    fk.ByteTokenizer().save(source)
    parser = argparse.ArgumentParser()
    add_quantize_command(parser.add_subparsers())
    args = parser.parse_args(["quantize", "--checkpoint", str(source), "--out", str(tmp_path / "int8")])
    args.func(args)
    assert "wrote int8 checkpoint" in capsys.readouterr().out
    loaded = load_quantized(tmp_path / "int8")
    assert fk.load_tokenizer(tmp_path / "int8").vocab_size == 259
    with torch.no_grad():
        assert _cosine(loaded(IDS).logits, model(IDS).logits) > 0.999


def test_from_pretrained_reads_quantized_dirs_and_save_pretrained_refuses_them(tmp_path):
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=1, d_model=32, n_heads=4, d_ff=64,
                                                      vocab_size=64, max_seq_len=16)).eval()
    quantized = fk.quantize_int8(model)
    fk.save_quantized(quantized, tmp_path / "q")
    loaded = fk.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.blocks[0].attn.qkv, fk.Int8Linear)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized(ids).logits)
    with pytest.raises(fk.InputError, match="save_quantized"):
        fk.save_pretrained(quantized, tmp_path / "plain")


def test_a_gpt2_checkpoint_loaded_in_place_quantizes_to_contiguous_int8(tmp_path):
    """GPT-2's Conv1D weights load as transposed views of the file; their int8 copies must suit the fused kernel."""
    model = _model("gpt2")
    fk.save_pretrained(model, tmp_path, format="hf")
    loaded = fk.from_pretrained(tmp_path)
    assert not loaded.blocks[0].attn.qkv.weight.is_contiguous()  # the case this test is about
    quantized = quantize_int8(loaded).to(torch.bfloat16)
    assert all(m.weight.is_contiguous() for m in quantized.modules() if isinstance(m, Int8Linear))
    with torch.no_grad():
        assert _cosine(quantized(IDS[:1, :1]).logits, model(IDS[:1, :1]).logits) > 0.99


def test_loaded_int8_benchmark_runs():
    from conftest import load_script

    out = load_script("benchmarks/int8_loaded.py").main(["--layers", "1", "--rounds", "1"])
    assert all(len(rates) == 1 and rates[0] > 0 for rates in out.values())
