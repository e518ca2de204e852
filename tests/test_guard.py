"""Runs that protect themselves: the run-directory lock, signals, unreadable checkpoints, explicit resume points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import formerkit as fk
from formerkit.train import train
from formerkit.train.guard import LOCK_FILE, RunLock
from formerkit.train.logging import read_metrics
from test_run_logger import _scalars
from test_train import TINY, config, corpus, losses


def _args(tmp_path: Path, run: str, steps: int = 1_000_000) -> list[str]:
    return [*TINY, "--data.source", str(corpus(tmp_path)), "--data.tokenizer", "byte", "--data.cache_dir",
            str(tmp_path / "cache"), "--train.steps", str(steps), "--train.batch_size", "4", "--train.seq_len", "32",
            "--train.precision", "fp32", "--train.threads", "1", "--checkpoint.every", "1000", "--eval.every",
            "1000", "--eval.batches", "1", "--log.every", "1", "--log.progress", "false", "--log.samples", "0",
            "--checkpoint.run_dir", str(tmp_path / run)]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "formerkit.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(r["step"] >= steps for r in read_metrics(metrics)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("the run did not reach its steps in time")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_second_run_is_refused_and_a_signal_saves_and_stops(tmp_path, sig, code):
    run = tmp_path / "run"
    first = _start(_args(tmp_path, "run"))
    _wait_for_steps(run, 3, first)
    holder = json.loads((run / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid
    second = _start(_args(tmp_path, "run"))
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert f"is in use by another formerkit train (pid {first.pid} on" in err
    first.send_signal(sig)
    out, err = first.communicate(timeout=120)
    assert first.returncode == code, err
    assert "Traceback" not in err
    stopped = [line for line in out.splitlines() if line.startswith(f"interrupted by {sig.name} at step")]
    assert len(stopped) == 1 and "run the same command to resume" in stopped[0]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:07d}"
    assert (run / LOCK_FILE).read_text() == ""  # released
    resumed = _start([*_args(tmp_path, "run", steps=step + 2), "--optim.schedule_restart", "true"])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming {run / 'checkpoints' / f'step-{step:07d}'} at step {step}" in out


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    victim = _start(_args(tmp_path, "run"))
    _wait_for_steps(run, 2, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    in_tensorboard = [step for step, _ in _scalars(run / "tensorboard").get("train/loss", [])]  # none yet: []
    # TensorBoard keeps the logged steps in order, short of at most the last two: on a loaded machine one run
    # held steps 1-2 of the 1-4 in metrics.jsonl, and one held none of 1-2 (why steps are lost despite the
    # writer's flush is not yet known)
    assert len(logged) >= 2 and in_tensorboard == logged[: len(in_tensorboard)]
    assert len(in_tensorboard) >= len(logged) - 2
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == victim.pid  # the file stays; the lock does not
    with pytest.warns(fk.FormerkitWarning, match=f"lock left by pid {victim.pid}"):
        result = train(config(tmp_path, "--checkpoint.run_dir", str(run), "--checkpoint.resume", "false",
                              "--log.samples", "0", steps=2))
    assert result.step == 2


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(fk.TrainingError, match=f"pid {os.getpid()}"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass


@pytest.mark.slow
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    args = ("--checkpoint.every", "10", "--log.samples", "0")
    train(config(tmp_path, *args, steps=20))
    run = tmp_path / "run"
    state = run / "checkpoints" / "step-0000020" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    with pytest.warns(fk.FormerkitWarning, match=r"step-0000020/trainer_state.pt cannot be read.*falling back to "
                                                 r"the previous checkpoint, step-0000010"):
        result = train(config(tmp_path, *args, steps=20))
    assert result.step == 20 and sorted(losses(run)) == list(range(1, 21))
    # `latest` naming a step that is gone: the newest one there is
    (run / "checkpoints" / "latest").write_text("step-0000030\n")
    with pytest.warns(fk.FormerkitWarning, match="names step-0000030, which is missing or incomplete; using "
                                                 "step-0000020"):
        again = train(config(tmp_path, *args, steps=20))
    assert again.step == 20


@pytest.mark.slow
def test_resume_from_a_named_step_directory(tmp_path, capsys):
    args = ("--checkpoint.every", "10", "--log.samples", "0")
    first = train(config(tmp_path, *args, steps=20))
    run = tmp_path / "run"
    capsys.readouterr()
    again = train(config(tmp_path, *args, "--checkpoint.resume", "step-0000010", steps=20))
    assert f"resuming {run / 'checkpoints' / 'step-0000010'} at step 10" in capsys.readouterr().out
    assert again.step == 20 and again.val["loss"] == pytest.approx(first.val["loss"], abs=1e-6)
    with pytest.raises(fk.CheckpointError, match=r"step-0000015: no such checkpoint.*step-0000020, step-0000010"):
        train(config(tmp_path, *args, "--checkpoint.resume", "step-0000015", steps=20))
    with pytest.raises(fk.TrainingError, match="already holds checkpoints"):
        train(config(tmp_path, *args, "--checkpoint.resume", "false", steps=20))
