"""Training checkpoints: a loadable model directory plus the optimizer, step and RNG states.

Layout under ``run_dir/checkpoints/``: one ``step-NNNNNNN/`` directory per save, holding the
model in formerkit's native format (so ``formerkit.from_pretrained`` reads it), the tokenizer,
and ``trainer_state.pt``; and ``latest``, a one-line file naming the newest complete one.
A save is written to a hidden temporary directory, renamed into place, and only then is
``latest`` replaced (atomically): a kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from formerkit.checkpoints import load_weights_into, save_pretrained
from formerkit.checkpoints.files import atomic_write, read_weights
from formerkit.errors import CheckpointError
from formerkit.model import Transformer

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """The random-number states that training consumes (torch CPU and CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The directory holding a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def save_checkpoint(run_dir: str | Path, step: int, model: Transformer, tokenizer, state: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint ``step`` (model, tokenizer, trainer ``state``), point ``latest`` at it, prune old ones.

    Returns the checkpoint directory.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    torch.save(state, tmp / STATE_FILE)
    with open(tmp / STATE_FILE, "rb") as fh:
        os.fsync(fh.fileno())
    if final.exists():  # re-saving a step after a resume: the old copy is not `latest` any more
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(root / "latest", lambda path: path.write_text(name + "\n"))
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in steps[: max(0, len(steps) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Resumed:
    """What a checkpoint restores: the step to continue from and the trainer state."""

    path: Path
    step: int
    state: dict[str, Any]


def load_checkpoint(path: Path, model: Transformer) -> Resumed:
    """Load weights from checkpoint ``path`` into ``model``; return its step and trainer state."""
    load_weights_into(model, read_weights(path), path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return Resumed(path=path, step=int(state["step"]), state=state)
