"""Smoke tests of the benchmark scripts (train_throughput, train_runs, load) on tiny models, so they cannot rot."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import load_script, require

require("transformers")



@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/train_throughput.py")


def test_tiny_run_measures_everything(bench, capsys):
    out = bench.main(["--small", "--steps", "2", "--warmup", "1", "--modes", "fp32,bf16", "--loss-steps", "3",
                      "--profile", "1", "--malloc", "default"])
    text = capsys.readouterr().out
    assert "targets:" in text and "loss parity" in text and "FLOPs/token" in text
    ours, theirs = out["initial_loss"]
    assert ours == pytest.approx(theirs, abs=1e-4)  # identical weights and loss
    assert set(out["tokens_per_s"]) == {(m, lib) for m in ("fp32", "bf16") for lib in ("formerkit", "transformers")}
    assert all(v > 0 for v in out["tokens_per_s"].values())
    assert all(len(r["times"]) == 2 for r in out["results"].values())
    assert out["peak"]["fp32"] > 0 and out["peak"]["bf16"] > 0
    parity = out["parity"]
    mode = out["default_mode"]  # what precision: auto measured fastest on this machine
    assert parity["precision"] == bench.MODES[mode][0] and len(parity["losses"]["fp32"]) == 3
    assert all(math.isfinite(v) for v in parity["final"].values())
    assert set(out["profile"]) == {("formerkit", mode), ("transformers", "bf16")}


def test_both_libraries_take_the_same_steps(bench):
    """fp32 training of the two libraries stays together: same weights, optimizer, schedule and loss."""
    shape = bench.Shape(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab=128, batch=2)
    hf_model, fk_model = bench.build_models(shape)
    pristine = {"formerkit": fk_model, "transformers": hf_model}
    batches = bench.markov_batches(4, shape)
    optim = bench.OptimSection(warmup_steps=1)
    runs = [bench.make_trainer(lib, pristine, "fp32", optim, 4) for lib in bench.LIBS]
    losses = [[tr.step(i, *batches[i]) for i in range(4)] for tr in runs]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert losses[0][-1] < losses[0][0]


def test_batches_and_flops(bench):
    shape = bench.Shape(vocab=64, seq_len=8, batch=2)
    a, b = bench.markov_batches(3, shape), bench.markov_batches(5, shape)
    for (xa, ya), (xb, yb) in zip(a, b[:3], strict=True):  # batch i does not depend on how many are drawn
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = a[0]
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    _, fk_model = bench.build_models(bench.Shape())
    total, terms = bench.flops_per_token(fk_model, bench.Shape())
    d, L, V, T = 384, 6, 8192, 256
    assert terms["N_nonembedding"] == L * (12 * d * d + 13 * d) + 2 * d  # GPT-2 blocks + final norm
    assert total == 6 * (terms["N_nonembedding"] + V * d) + 12 * L * d * T


def test_whole_run_comparison_runs_all_three_on_the_same_data():
    runs = load_script("benchmarks/train_runs.py")
    out = runs.main(["--small", "--steps", "3", "--source", "json", "--vocab", "400"])
    assert set(out["best"]) == {"formerkit train", "transformers Trainer", "plain loop"}
    assert all(r["tokens_per_s"] > 0 and r["wall_s"] > 0 for r in out["best"].values())
    # the same weights, windows, schedule and precision: formerkit's run and the plain loop end on the same loss
    assert out["best"]["formerkit train"]["final_loss"] == pytest.approx(out["best"]["plain loop"]["final_loss"],
                                                                         rel=1e-4)
    assert math.isfinite(out["best"]["transformers Trainer"]["val_loss"])
    assert out["ratio"] > 0 and out["loop_share"] > 0


@pytest.mark.slow
def test_load_benchmark_measures_both_libraries_in_fresh_processes(capsys):
    load = load_script("benchmarks/load.py")
    out = load.main(["--small", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "targets:" in text and "machine:" in text and "load + first read" in text
    best = out["best"]
    assert set(best) == {"formerkit", "transformers"} and out["disk"] > 0
    assert best["formerkit"]["params"] == best["transformers"]["params"]  # the same model, tied head counted once
    for b in best.values():
        assert b["finite"] and b["seconds"] > 0 and b["increase"] > 0 and b["peak_after_use"] >= b["peak"]
