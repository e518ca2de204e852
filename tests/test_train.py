"""The training engine end to end on tiny models: objectives, outputs, resume, accumulation, failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import formerkit as fk
from formerkit.data import eval_batches, load_corpus, resolve_source
from formerkit.train import TrainConfig, train
from formerkit.train.logging import read_metrics
from formerkit.train.objectives import CausalLM

TINY = ["--model.n_layers", "2", "--model.d_model", "32", "--model.n_heads", "4", "--model.d_ff", "64",
        "--model.max_seq_len", "64"]


def corpus(tmp_path: Path, n_files: int = 12) -> Path:
    """A small directory of Python-like text with learnable structure."""
    root = tmp_path / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(30)]
        (root / f"module_{i}.py").write_text("".join(lines))
    return root


def config(tmp_path: Path, *extra: str, steps: int = 30) -> TrainConfig:
    args = [*TINY, "--data.source", str(corpus(tmp_path)), "--data.tokenizer", "byte",
            "--data.cache_dir", str(tmp_path / "cache"), "--data.val_fraction", "0.2",
            "--train.steps", str(steps), "--train.batch_size", "8", "--train.seq_len", "32",
            "--train.precision", "fp32", "--optim.lr", "3e-3", "--optim.warmup_steps", "5",
            "--eval.every", "10", "--eval.batches", "4", "--checkpoint.every", "10",
            "--checkpoint.run_dir", str(tmp_path / "run"), "--log.every", "1", "--log.progress", "false",
            "--log.samples", "1", "--log.sample_tokens", "20", *extra]
    return TrainConfig.load(None, args)


def losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split}


@pytest.mark.slow
def test_causal_run_learns_and_writes_everything(tmp_path):
    result = train(config(tmp_path, steps=60))
    run = tmp_path / "run"
    train_losses = losses(run)
    assert sorted(train_losses) == list(range(1, 61))
    assert train_losses[60] < 0.6 * train_losses[1]  # it learns
    assert result.val["loss"] < 0.7 * math.log(259)
    assert result.val["perplexity"] == pytest.approx(math.exp(result.val["loss"]))
    assert sorted(losses(run, "val")) == [10, 20, 30, 40, 50, 60]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tensorboard").iterdir())
    assert (run / "config.yaml").is_file()
    assert result.checkpoint.name == "step-0000060"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000050", "step-0000060"]
    model, tok = fk.from_pretrained(run), fk.load_tokenizer(run)  # a run dir loads its latest checkpoint
    assert model.config.n_layers == 2 and tok.vocab_size == 259
    assert len(result.samples) == 1 and isinstance(result.samples[0], str)
    assert (run / "samples.txt").read_text() == result.samples[0] + "\n"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps_done"], summary["steps_planned"], summary["precision"]) == (60, 60, "fp32")
    assert summary["tokens_per_s"] > 0 and summary["val_loss"] == result.val["loss"]
    # bits per byte, recomputed: the byte tokenizer's ids below 256 are one byte each, its end-of-text none
    windows = eval_batches(load_corpus(resolve_source(str(tmp_path / "corpus")), fk.ByteTokenizer(),
                                       cache_dir=tmp_path / "cache", val_fraction=0.2).val,
                           batch_size=8, seq_len=32, max_batches=4)
    targets = torch.cat([y.flatten() for _, y in windows])
    bytes_per_token = (targets < 256).float().mean().item()
    assert summary["val_bpb"] == pytest.approx(result.val["loss"] / math.log(2) / bytes_per_token)
    assert summary["val_bpb"] == result.val["bits_per_byte"]
    # the corpus is Python: the samples are measured against it
    assert 0 <= summary["sample_python_line_share"] <= 1 and 0 <= summary["sample_token_kind_tv"] <= 1
    assert summary["corpus_python_line_share"] > 0.9  # the toy corpus is all one-line statements


@pytest.mark.parametrize("faster", ["bf16", "fp32"])
def test_auto_precision_follows_the_probe_and_says_so_first(tmp_path, monkeypatch, capsys, faster):
    from formerkit import precision

    seconds = {"fp32": (64, 0.01), "bf16": (64, 0.004 if faster == "bf16" else 0.03)}
    monkeypatch.setattr(precision, "measure", lambda probe, names, rows, device, budget_s: seconds)
    result = train(config(tmp_path, "--train.precision", "auto", "--log.samples", "0", steps=3))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("formerkit train: starting;")
    assert f"precision {faster} (auto: measured on cpu" in first and "fp32 10.00 ms for 64 rows" in first
    assert result.precision == faster
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"] == faster


@pytest.mark.slow
def test_fp16_autocast_trains_with_loss_scaling(tmp_path):
    result = train(config(tmp_path, "--train.precision", "fp16", "--optim.lr", "1e-2", steps=12))
    ls = losses(tmp_path / "run")
    assert ls[12] < 0.8 * ls[1] and math.isfinite(result.val["loss"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000012" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the loss scale is saved for resume
    more = train(config(tmp_path, "--train.precision", "fp16", "--optim.schedule_restart", "true", steps=14))
    assert more.step == 14


@pytest.mark.slow
def test_sample_command_reads_a_run_directory(tmp_path, capsys):
    from formerkit.cli import main

    train(config(tmp_path, steps=20))
    capsys.readouterr()
    args = ["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "12",
            "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("def ")  # seeded: reproducible
    assert main([*args[:-2], "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path):
    train(config(tmp_path, steps=20))
    with pytest.raises(fk.ConfigError, match=r"planned for 20 steps.*--optim.schedule_restart true.*--model.init_from"):
        train(config(tmp_path, steps=30))  # the cosine schedule would jump: say what to do instead
    more = train(config(tmp_path, "--optim.schedule_restart", "true", steps=30))
    assert sorted(losses(tmp_path / "run")) == list(range(1, 31))  # no duplicates, no gap
    assert more.step == 30
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"}
    assert lrs[21] == pytest.approx(3e-3 / 5)  # a new warmup (5 steps) starts at the resume step
    assert lrs[25] == pytest.approx(3e-3) and lrs[30] < lrs[25]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000030" / "trainer_state.pt", weights_only=True)
    assert state["schedule"] == {"start": 20, "end": 30}
    again = train(config(tmp_path, steps=30))  # the restarted schedule is the run's own now: no flag needed
    assert again.step == 30


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a = train(config(tmp_path / "a", steps=5))
    b = train(config(tmp_path / "b", "--train.grad_accum", "4", steps=5))
    la, lb = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    for step in range(1, 6):
        assert abs(la[step] - lb[step]) < 1e-5
    assert abs(a.val["loss"] - b.val["loss"]) < 1e-5


@pytest.mark.slow
def test_bf16_autocast_trains(tmp_path):
    result = train(config(tmp_path, "--train.precision", "bf16", steps=40))
    ls = losses(tmp_path / "run")
    assert ls[40] < 0.7 * ls[1] and math.isfinite(result.val["loss"])
    model = fk.from_pretrained(tmp_path / "run")
    assert model.tok_embed.weight.dtype == torch.float32  # fp32 master weights are what is saved


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = CausalLM.loss
    calls = {"n": 0}

    def sometimes_nan(self, model, batch):
        calls["n"] += torch.is_grad_enabled()  # count training micro-steps, not evaluation batches
        loss = original(self, model, batch)
        return loss * float("nan") if calls["n"] == 15 else loss

    monkeypatch.setattr(CausalLM, "loss", sometimes_nan)
    with pytest.raises(fk.TrainingError, match=r"at step 15.*step-0000010"):
        train(config(tmp_path, steps=30))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000010"
    fk.from_pretrained(tmp_path / "run")


@pytest.mark.slow
def test_mlm_objective_learns_and_reports_accuracy(tmp_path):
    result = train(config(tmp_path, "--train.objective", "mlm", "--optim.lr", "5e-3", steps=60))
    ls = losses(tmp_path / "run")
    assert ls[60] < 0.8 * ls[1]
    assert 0.0 <= result.val["accuracy"] <= 1.0 and result.val["accuracy"] > 0.2
    model = fk.from_pretrained(tmp_path / "run")
    assert model.config.kind == "encoder" and model.config.head == "mlm"


@pytest.mark.slow
def test_classification_objective_reaches_high_accuracy(tmp_path):
    rows = []
    for i in range(200):
        good = i % 2 == 0
        word = ["great", "lovely", "fine"][i % 3] if good else ["awful", "bad", "poor"][i % 3]
        rows.append({"text": f"the movie number {i} was {word}", "label": "pos" if good else "neg"})
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = config(tmp_path, "--train.objective", "classify", "--data.source", str(path), "--train.seq_len", "48",
                 "--train.batch_size", "16", steps=80)
    result = train(cfg)
    assert result.val["accuracy"] >= 0.9
    model = fk.from_pretrained(tmp_path / "run")
    assert model.config.head == "classifier" and model.config.num_labels == 2


def test_config_file_and_overrides(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("model:\n  preset: llama\n  n_layers: 3\ntrain:\n  steps: 7\n  batch_size: 4\n")
    cfg = TrainConfig.load(run_yaml, ["--train.steps", "9", "--model.d_model=64", "--log.progress", "false"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.log.progress) == (9, 4, False)
    assert cfg.model == {"preset": "llama", "n_layers": 3, "d_model": 64}
    # a preset named on the command line keeps its own sizes; without one the default model applies
    assert TrainConfig.load(None, ["--model.preset", "vit-digits"]).model == {"preset": "vit-digits"}
    assert TrainConfig.load(None, ["--model.n_layers", "2"]).model["d_model"] == 320
    with pytest.raises(fk.ConfigError, match='unknown option "train.stepz".*did you mean "steps"'):
        TrainConfig.load(None, ["--train.stepz", "3"])
    with pytest.raises(fk.ConfigError, match='unknown option "model.n_layer".*"n_layers"'):
        TrainConfig.load(None, ["--model.n_layer", "3"])
    with pytest.raises(fk.ConfigError, match="needs a value"):
        TrainConfig.load(None, ["--train.steps"])
    with pytest.raises(fk.ConfigError, match="divisible"):
        TrainConfig.load(None, ["--train.batch_size", "6", "--train.grad_accum", "4"])


def test_cli_help_lists_every_option(capsys):
    from formerkit.cli import main
    from formerkit.train.config import SECTIONS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name, section in SECTIONS.items():
        for f in section.__dataclass_fields__:
            assert f"--{name}.{f}" in out


def test_cli_reports_bad_data(tmp_path, capsys):
    from formerkit.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data.source", str(empty), "--log.progress", "false",
                 "--checkpoint.run_dir", str(tmp_path / "r")]) == 2
    assert "formerkit: error:" in capsys.readouterr().err
    assert main(["train", "--data.source", str(tmp_path / "missing.txt"),
                 "--checkpoint.run_dir", str(tmp_path / "r2")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(f'{{"text": "t{i}", "label": "{name}"}}\n' for i, name in enumerate("xyzx")))
    assert main(["train", "--train.objective", "classify", "--model.num_labels", "2", "--data.source", str(labeled),
                 "--data.tokenizer", "byte", "--checkpoint.run_dir", str(tmp_path / "r3")]) == 2
    assert "3 distinct labels (x, y, z), more than model.num_labels=2" in capsys.readouterr().err


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "formerkit.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A run killed with SIGKILL mid-way and resumed reaches the same losses, bit for bit."""
    base = config(tmp_path / "x", steps=1)  # materializes the corpus
    source = base.data.source

    def args(run: str) -> list[str]:
        return [*TINY, "--data.source", source, "--data.tokenizer", "byte", "--data.cache_dir",
                str(tmp_path / "cache"), "--train.steps", "150", "--train.batch_size", "8", "--train.seq_len", "48",
                "--train.precision", "fp32", "--model.resid_dropout", "0.1", "--checkpoint.every", "20",
                "--eval.every", "50", "--log.every", "1", "--log.progress", "false", "--log.samples", "0",
                "--checkpoint.run_dir", str(tmp_path / run),
                # the kernels fixed: two fresh runs timed apart may choose differently (a resume reuses the choice)
                "--optim.kernel", "foreach", "--train.attention", "sdpa"]

    assert _cli(args("straight")).wait(timeout=300) == 0
    victim = _cli(args("killed"))
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = [r["step"] for r in read_metrics(metrics)] if metrics.is_file() else []
        if done and max(done) >= 70:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(r["step"] for r in read_metrics(metrics))
    assert 70 <= killed_at < 150, "the run must be killed mid-way"
    resumed = _cli(args("killed"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in out
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 151))
    for step in range(1, 151):
        assert a[step] == b[step], f"step {step}: {a[step]!r} != {b[step]!r}"
    va, vb = losses(tmp_path / "straight", "val"), losses(tmp_path / "killed", "val")
    assert va[150] == vb[150]


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    eager = train(config(tmp_path / "eager", steps=6))
    compiled = train(config(tmp_path / "compiled", "--train.compile", "true", steps=6))
    le, lc = losses(tmp_path / "eager" / "run"), losses(tmp_path / "compiled" / "run")
    for step in range(1, 7):
        assert abs(le[step] - lc[step]) < 1e-3
    assert abs(eager.val["loss"] - compiled.val["loss"]) < 1e-3
    fk.from_pretrained(tmp_path / "compiled" / "run")  # the checkpoint holds plain (uncompiled) names
