"""Smoke test of benchmarks/generate_throughput.py on a tiny model, so the benchmark cannot rot."""

from __future__ import annotations

import pytest
import torch

from conftest import load_script, require

require("transformers")



@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/generate_throughput.py")


def test_tiny_run_measures_every_variant(bench, capsys):
    out = bench.main(["--models", "tiny", "--batches", "1,2", "--new-tokens", "5", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "read bandwidth" in text and "int8 / own fp32" in text
    assert out["same_tokens"]["tiny"] is True
    libraries = {(r.batch, r.precision, r.library) for r in out["best"]}
    expected = {(b, p, lib) for b in (1, 2) for p in ("fp32", "bf16") for lib in ("formerkit", "transformers")}
    assert libraries == expected | {(1, "int8", "formerkit"), (2, "int8", "formerkit")}
    assert all(v > 0 for v in out["best"].values()) and out["bandwidth"] > 0


def test_a_llama_shape_with_prompt_speed(bench, capsys):
    out = bench.main(["--models", "llama-tiny", "--batches", "1", "--precisions", "fp32", "--new-tokens", "4",
                      "--repeats", "1", "--prompt-speed", "24"])
    assert out["same_tokens"]["llama-tiny"] is True
    assert {(r.precision, r.library) for r in out["prefill"]} == {("fp32", "formerkit"), ("fp32", "transformers")}
    assert "prompt tokens/s" in capsys.readouterr().out


def test_llamacpp_columns_need_the_optional_reference(bench, monkeypatch):
    monkeypatch.setattr(bench.llamacpp, "available", lambda: "llama-cpp-python is not installed")
    with pytest.raises(SystemExit, match="--llamacpp: llama-cpp-python is not installed"):
        bench.main(["--models", "llama-tiny", "--llamacpp"])


def test_weight_bytes_count_every_linear_once(bench, tmp_path):
    ours, theirs = bench.build_pair("tiny", tmp_path)
    _, n_layers, d, *_ = bench.SHAPES["tiny"]
    per_layer = d * 3 * d + d * d + d * 4 * d + 4 * d * d  # qkv, out, fc_in, fc_out
    expected = n_layers * per_layer + bench.VOCAB * d  # + the (tied) LM head, read every step
    assert bench.weight_bytes_per_token(ours) == 4 * expected
    int8 = bench.quantize_int8(ours.to(torch.bfloat16))
    scales = n_layers * (3 * d + d + 4 * d + d) + bench.VOCAB  # one float32 scale per output channel
    assert bench.weight_bytes_per_token(int8) == expected + 4 * scales


def test_int4_variant_and_its_weight_bytes(bench, tmp_path):
    ours, theirs = bench.build_pair("tiny", tmp_path)
    _, n_layers, d, *_ = bench.SHAPES["tiny"]
    int4 = bench.variants(ours, theirs, ["int4"], group_size=32)["int4", "formerkit"]
    assert {type(m).__name__ for m in int4.modules()} >= {"Int4Linear"}
    weights = n_layers * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + bench.VOCAB * d  # as above
    groups = weights // 32
    # half a byte per weight; a scale (bf16: the model was converted) and a uint8 zero point per group
    assert bench.weight_bytes_per_token(int4) == weights // 2 + groups * (2 + 1)


def test_decode_steps_alone_are_compared_with_llamacpp(bench, monkeypatch, capsys, tmp_path):
    """With llama.cpp faked (its rate counts decode steps only), formerkit's steps are timed without the prefill."""
    monkeypatch.setattr(bench.llamacpp, "available", lambda: None)
    monkeypatch.setattr(bench.llamacpp, "convert", lambda directory, out, precision: tmp_path / f"{precision}.gguf")
    monkeypatch.setattr(bench.llamacpp, "measure", lambda *a, **k: {"decode_tps": 100.0, "prompt_tps": 50.0})
    monkeypatch.setattr(bench, "agreement", lambda *a, **k: 4)
    out = bench.main(["--models", "llama-tiny", "--batches", "1", "--precisions", "fp32", "--new-tokens", "6",
                      "--repeats", "1", "--llamacpp"])
    ours = out["steps"][bench.Run("llama-tiny", 1, "fp32", "formerkit")]
    assert ours > 0 and out["steps"][bench.Run("llama-tiny", 1, "fp32", "llama.cpp")] == 100.0
    assert out["ratios"]["llama-tiny"][1, "fp32", "steps llama.cpp"] == pytest.approx(ours / 100.0)
    assert "decode steps alone" in capsys.readouterr().out
