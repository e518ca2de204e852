"""Weight-only int4 quantization: the per-group error bound, kernel vs fallback, model accuracy, save/load, the CLI."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from torch import nn

import formerkit as fk
from formerkit.checkpoints.quantized import QUANTIZATION_FILE, load_quantized, save_quantized
from formerkit.layers.int4 import Int4Linear, pack_nibbles, quantize_int4, quantize_weight_int4, unpack_nibbles
from formerkit.layers.linear import Linear
from formerkit.layers.quantized import Int8Linear, quantize_int8
from formerkit.quantize import add_quantize_command, weight_bytes

SMALL = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=96, max_seq_len=40)
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
KERNEL = torch.ops.aten._weight_int4pack_mm_for_cpu

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset: str = "gpt2", **kw) -> fk.Transformer:
    torch.manual_seed(0)
    if preset == "llama":
        kw.setdefault("n_kv_heads", 2)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **kw})).eval()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def _count_kernel_calls(monkeypatch) -> list:
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return KERNEL(*args)

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", counted)
    return calls


def test_hand_computed_asymmetric_group():
    w = torch.tensor([[-1.5] + [0.0] * 30 + [3.0]])  # one group of 32: min -1.5, max 3
    codes, scale, zero = quantize_weight_int4(w, 32)
    assert torch.allclose(scale, torch.tensor([[0.3]]))  # (3 - (-1.5)) / 15
    assert zero.tolist() == [[5]]  # round(1.5 / 0.3)
    assert codes[0, 0] == 0 and codes[0, 1] == 5 and codes[0, 31] == 15
    layer = Int4Linear.from_linear(nn.Linear(32, 1), 32)
    layer.qweight, layer.scale, layer.zero = pack_nibbles(codes), scale, zero
    assert torch.allclose(layer.dequantize(), w, atol=1e-6)  # -1.5, 0 and 3 are all on the grid


def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 3], codes[:, 6] + 16 * codes[:, 7])  # even feature in the low nibble
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_within_half_a_step_per_group(group_size, symmetric):
    torch.manual_seed(group_size)
    weight = torch.randn(48, 256) * torch.rand(48, 1) * 3  # rows of very different ranges
    weight[0, :group_size] = torch.rand(group_size) + 0.5  # a group of positive weights only
    weight[1, :group_size] = 0  # a group of zeros
    linear = nn.Linear(256, 48)
    linear.weight.data = weight
    layer = Int4Linear.from_linear(linear, group_size, symmetric=symmetric)
    step = layer.scale.repeat_interleave(group_size, dim=1)  # (48, 256): each weight's group scale
    error = (layer.dequantize() - weight).abs()
    assert (error <= step / 2 + 1e-6).all()
    assert (layer.dequantize()[1, :group_size] == 0).all()
    groups = weight.view(48, -1, group_size)  # (out, G, g)
    expected_scale = groups.abs().amax(-1) / 7 if symmetric else \
        (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15
    assert torch.allclose(layer.scale, expected_scale)


@pytest.mark.parametrize("rows", [1, 8, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_kernel_equals_dequantized_fallback(monkeypatch, rows, symmetric):
    calls = _count_kernel_calls(monkeypatch)
    torch.manual_seed(rows)
    linear = nn.Linear(128, 64)
    layer = Int4Linear.from_linear(linear, 32, symmetric=symmetric)
    x = torch.randn(rows, 128).bfloat16()
    with torch.no_grad():
        fast = layer(x)  # the int4 kernel
        reference = x.float() @ layer.dequantize().T + linear.bias  # float32 brute force
        fallback = layer._dequantized_matmul(x)
    assert calls == [rows] and fast.dtype == torch.bfloat16 and fallback.dtype == torch.bfloat16
    assert torch.allclose(fast.float(), reference, rtol=2e-2, atol=2e-2)
    assert torch.allclose(fallback.float(), reference, rtol=1e-2, atol=1e-2)
    assert torch.allclose(fast.float(), fallback.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("case", ["float32", "many rows", "out not 16-aligned", "grad"])
def test_fallback_cases(monkeypatch, case):
    calls = _count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    linear = nn.Linear(64, 40 if case == "out not 16-aligned" else 48)
    layer = Int4Linear.from_linear(linear, 32)
    x = torch.randn(200 if case == "many rows" else 3, 64)
    if case != "float32":
        x = x.bfloat16()
    if case == "grad":
        x.requires_grad_(True)
    y = layer(x)
    reference = x.detach().float() @ layer.dequantize().T + linear.bias
    assert calls == [] and y.dtype == x.dtype
    assert torch.allclose(y.float(), reference, rtol=1e-2, atol=1e-2 if x.dtype == torch.bfloat16 else 1e-5)
    if case == "grad":
        y.float().sum().backward()
        assert torch.allclose(x.grad.float(), layer.dequantize().sum(0).expand(3, 64), rtol=1e-2, atol=1e-2)


def test_kernel_weights_follow_a_new_weight():
    layer = Int4Linear.from_linear(nn.Linear(64, 32), 64)
    x = torch.randn(1, 64).bfloat16()
    with torch.no_grad():
        before = layer(x)
        replacement = Int4Linear.from_linear(nn.Linear(64, 32), 64)
        layer.load_state_dict(replacement.state_dict())
        after = layer(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after.float(), replacement(x).float())


@pytest.mark.parametrize("group_size, in_features, message", [
    (16, 64, "must be one of 32, 64, 128"),
    (64, 96, "use group size 32"),
    (32, 40, "no int4 group size divides it"),
])
def test_bad_group_size_or_in_features(group_size, in_features, message):
    with pytest.raises(fk.InputError, match=message):
        Int4Linear.from_linear(nn.Linear(in_features, 16), group_size)


def test_quantize_int4_names_the_layer_and_leaves_the_model_alone():
    model = _model("gpt2", d_model=96, n_heads=4)  # 96 features: group size 64 does not divide them
    with pytest.raises(fk.InputError, match=r"layer 'blocks.0.attn.qkv'.*use group size 32"):
        quantize_int4(model, 64)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    with pytest.raises(fk.InputError, match="nn.Module"):
        quantize_int4("model")
    with pytest.raises(fk.InputError, match="floating-point"):
        Int4Linear.from_linear(nn.Linear(32, 16), 32)(torch.ones(2, 32, dtype=torch.long))
    with pytest.raises(fk.InputError, match="32 features"):
        Int4Linear.from_linear(nn.Linear(32, 16), 32)(torch.ones(2, 31))


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_quantized_model_close_to_float_and_generates(preset):
    model = _model(preset)
    quantized = quantize_int4(copy.deepcopy(model), 32)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert isinstance(quantized.lm_head.proj, Int4Linear)
    with torch.no_grad():
        assert _cosine(quantized(IDS).logits, model(IDS).logits) > 0.99
        bf16 = copy.deepcopy(quantized).to(torch.bfloat16)
        assert _cosine(bf16(IDS[:1]).logits, model(IDS[:1]).logits) > 0.98
    prompt = IDS[:1, :4]
    out = fk.generate(bf16, prompt, max_new_tokens=8)
    ids = prompt
    with torch.no_grad():  # greedy by hand: the argmax of the full forward at each step
        for _ in range(8):
            ids = torch.cat([ids, bf16(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_tied_head_choices():
    model = _model("gpt2")
    assert model.lm_head.proj.weight is model.tok_embed.weight
    kept = quantize_int4(copy.deepcopy(model), quantize_tied_head=False)
    assert type(kept.lm_head.proj) is Linear and kept.lm_head.proj.weight is kept.tok_embed.weight
    copied = quantize_int4(copy.deepcopy(model))
    int8 = quantize_int8(copy.deepcopy(model))
    assert weight_bytes(kept) < weight_bytes(copied) < weight_bytes(int8) < weight_bytes(model)


@pytest.mark.parametrize("symmetric, tied_head", [(False, True), (True, False)])
def test_save_load_round_trip(tmp_path, symmetric, tied_head):
    quantized = quantize_int4(_model("llama"), 32, symmetric=symmetric, quantize_tied_head=tied_head)
    out = save_quantized(quantized, tmp_path / "q")
    meta = json.loads((out / QUANTIZATION_FILE).read_text())
    assert meta == {"method": "int4-weight-only", "bits": 4, "group_size": 32, "symmetric": symmetric,
                    "quantize_tied_head": False}  # llama's head is not tied
    for loaded in (load_quantized(out), fk.from_pretrained(out)):
        layer = loaded.blocks[0].mlp.fc_in
        assert isinstance(layer, Int4Linear) and layer.qweight.dtype == torch.uint8
        assert (layer.group_size, layer.symmetric) == (32, symmetric)
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, quantized(IDS).logits)
    bf16 = load_quantized(out, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(bf16(IDS[:1]).logits, copy.deepcopy(quantized).to(torch.bfloat16)(IDS[:1]).logits)
    with pytest.raises(fk.InputError, match="save_quantized"):
        fk.save_pretrained(quantized, tmp_path / "plain")


def test_int8_dirs_record_bits_and_old_ones_still_load(tmp_path):
    quantized = quantize_int8(_model("gpt2"))
    out = save_quantized(quantized, tmp_path / "q")
    meta = json.loads((out / QUANTIZATION_FILE).read_text())
    assert meta["bits"] == 8
    del meta["bits"]  # as written before int4 existed
    (out / QUANTIZATION_FILE).write_text(json.dumps(meta))
    loaded = load_quantized(out)
    assert isinstance(loaded.blocks[0].attn.qkv, Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, quantized(IDS).logits)


def test_mixed_models_and_bad_metadata(tmp_path):
    model = quantize_int4(_model("gpt2"), 32)
    model.blocks[0].attn.out = Int4Linear.from_linear(nn.Linear(64, 64), 64)
    with pytest.raises(fk.InputError, match="one quantization"):
        save_quantized(model, tmp_path / "mixed")
    out = save_quantized(quantize_int4(_model("gpt2"), 32), tmp_path / "q")
    meta = json.loads((out / QUANTIZATION_FILE).read_text())
    (out / QUANTIZATION_FILE).write_text(json.dumps({**meta, "group_size": 48}))
    with pytest.raises(fk.CheckpointError, match="bad int4 settings"):
        load_quantized(out)


def test_quantize_command(tmp_path, capsys):
    model = _model("gpt2", vocab_size=259)
    source = fk.save_pretrained(model, tmp_path / "float")
    fk.ByteTokenizer().save(source)
    parser = argparse.ArgumentParser()
    add_quantize_command(parser.add_subparsers())
    args = parser.parse_args(["quantize", "--checkpoint", str(source), "--out", str(tmp_path / "int4"),
                              "--bits", "4", "--group-size", "32"])
    args.func(args)
    assert "wrote int4 checkpoint" in capsys.readouterr().out
    loaded = fk.from_pretrained(tmp_path / "int4")
    assert isinstance(loaded.blocks[1].mlp.fc_out, Int4Linear) and loaded.blocks[1].mlp.fc_out.group_size == 32
    assert fk.load_tokenizer(tmp_path / "int4").vocab_size == 259
    with torch.no_grad():
        assert _cosine(loaded(IDS).logits, model(IDS).logits) > 0.99
    bad = parser.parse_args(["quantize", "--checkpoint", str(source), "--out", str(tmp_path / "x"),
                             "--group-size", "32"])
    with pytest.raises(fk.InputError, match="--bits 4 only"):
        bad.func(bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--checkpoint", str(source), "--out", "x", "--bits", "4",
                           "--group-size", "48"])
