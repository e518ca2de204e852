"""`formerkit train` under torchrun with 2 CPU processes (gloo): DDP and FSDP equal one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import formerkit as fk
from formerkit.train.logging import read_metrics

pytestmark = pytest.mark.slow


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        (root / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(30)))
    return root


def _args(tmp_path: Path, run: str, steps: int, *extra: str) -> list[str]:
    return ["--model.n_layers", "2", "--model.d_model", "32", "--model.n_heads", "4", "--model.d_ff", "64",
            "--model.max_seq_len", "64", "--data.source", str(_corpus(tmp_path / "corpus")),
            "--data.tokenizer", "byte", "--data.cache_dir", str(tmp_path / "cache"), "--train.steps", str(steps),
            "--train.batch_size", "8", "--train.seq_len", "32", "--train.precision", "fp32",
            "--optim.lr", "0.01", "--optim.warmup_steps", "1", "--eval.every", "3", "--eval.batches", "2",
            "--checkpoint.every", "3", "--log.every", "1", "--log.progress", "false", "--log.samples", "0",
            "--checkpoint.run_dir", str(tmp_path / run), *extra]


def _run(args: list[str], processes: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "formerkit.cli", "train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--standalone", "-m", "formerkit.cli", "train", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], r["split"]): r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert ma.keys() == mb.keys()
    for key in ma:
        assert abs(ma[key] - mb[key]) < 1e-5, (key, ma[key], mb[key])
    wa, wb = fk.from_pretrained(a).state_dict(), fk.from_pretrained(b).state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_ddp_two_processes_equal_one(tmp_path):
    _run(_args(tmp_path, "single", 8, "--train.grad_accum", "2"), 1)
    out = _run(_args(tmp_path, "ddp", 8, "--train.grad_accum", "2"), 2)
    assert "2 process(es)" in out and out.count("formerkit train: starting") == 1  # rank 0 alone reports
    _assert_same_run(tmp_path / "single", tmp_path / "ddp")


def test_fsdp_two_processes_equal_one_and_resume(tmp_path):
    _run(_args(tmp_path, "single", 6), 1)
    _run(_args(tmp_path, "fsdp", 6, "--train.fsdp", "true"), 2)
    _assert_same_run(tmp_path / "single", tmp_path / "fsdp")
    # resume both to 9 steps under a new schedule: the sharded optimizer state round-trips through the checkpoint
    _run(_args(tmp_path, "single", 9, "--optim.schedule_restart", "true"), 1)
    assert "resuming" in _run(_args(tmp_path, "fsdp", 9, "--train.fsdp", "true", "--optim.schedule_restart", "true"), 2)
    _assert_same_run(tmp_path / "single", tmp_path / "fsdp")


def test_fsdp_needs_several_processes(tmp_path):
    with pytest.raises(fk.ConfigError, match="torchrun"):
        from formerkit.train import TrainConfig, train

        train(TrainConfig.load(None, _args(tmp_path, "x", 2, "--train.fsdp", "true")))
