"""Training checkpoints: a loadable model directory plus the optimizer, step and RNG states.

Layout under ``run_dir/checkpoints/``: one ``step-NNNNNNN/`` directory per save, holding the
model in formerkit's native format (so ``formerkit.from_pretrained`` reads it), the tokenizer,
and ``trainer_state.pt``; and ``latest``, a one-line file naming the newest complete one.
A save is written to a hidden temporary directory, renamed into place, and only then is
``latest`` replaced (atomically): a kill at any moment leaves the previous checkpoint whole.
Resuming reads a checkpoint whole before trusting it, and falls back to the previous one when
the newest is unreadable (a disk error, a file truncated by hand) or ``latest`` names a step that
is gone.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from formerkit.checkpoints import save_pretrained
from formerkit.checkpoints.files import read_weights
from formerkit.errors import CheckpointError, FormerkitWarning
from formerkit.fileio import atomic_write
from formerkit.model import Transformer
from formerkit.rundir import checkpoints_dir, latest_pointer
from formerkit.tokenizers import FORMERKIT_FILE, Tokenizer, load_tokenizer

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


def _saved_steps(run_dir: str | Path) -> list[Path]:
    """The run's complete-looking step directories (with a trainer state), newest first."""
    root = checkpoints_dir(run_dir)
    steps = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(steps, key=lambda p: p.name, reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run: the one ``latest`` names, else the newest step directory; None when none.

    ``latest`` naming a step that is gone (deleted by hand) falls back to the newest step
    directory there is, with a warning.
    """
    pointer = latest_pointer(run_dir)
    steps = _saved_steps(run_dir)
    if pointer.is_file():
        named = checkpoints_dir(run_dir) / pointer.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
        if steps:
            warnings.warn(f"{pointer} names {named.name}, which is missing or incomplete; using {steps[0].name}",
                          FormerkitWarning, stacklevel=2)
    return steps[0] if steps else None


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
    atomic_write(latest_pointer(run_dir), lambda path: path.write_text(name + "\n"))
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in steps[: max(0, len(steps) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Resumed:
    """What a checkpoint restores: where it is, the step to continue from, the weights and the trainer state."""

    path: Path
    step: int
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None  # None for image models


def read_checkpoint(path: Path) -> Resumed:
    """Read checkpoint ``path`` whole (trainer state, weights, tokenizer); CheckpointError if any part is bad."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or corrupt file: pickle, zip and EOF errors of every kind
        raise CheckpointError(f"{path / STATE_FILE} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / STATE_FILE} is not a trainer state")
    weights = read_weights(path)
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", FORMERKIT_FILE))
    tokenizer = load_tokenizer(path) if has_tokenizer else None
    return Resumed(path=path, step=int(state["step"]), state=state, weights=weights, tokenizer=tokenizer)


def resume_point(run_dir: str | Path, which: str | bool = True) -> Resumed | None:
    """The checkpoint a run resumes from, read whole; None when the run has none.

    ``which`` is True (the newest readable checkpoint: an unreadable newest one falls back to
    the previous, with a warning) or a step directory's name or path (that one, or a
    CheckpointError listing the run's checkpoints).
    """
    steps = _saved_steps(run_dir)
    if which is not True:
        path = Path(str(which))
        path = path if path.is_dir() else checkpoints_dir(run_dir) / path.name
        if not (path / STATE_FILE).is_file():
            have = ", ".join(p.name for p in steps) or "none"
            raise CheckpointError(f"--checkpoint.resume {which}: no such checkpoint in {checkpoints_dir(run_dir)} "
                                  f"(checkpoints there: {have})")
        return read_checkpoint(path)
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [newest] + [p for p in steps if p != newest]
    for i, path in enumerate(candidates):
        try:
            return read_checkpoint(path)
        except CheckpointError as err:
            if i + 1 == len(candidates):
                raise CheckpointError(f"no readable checkpoint in {checkpoints_dir(run_dir)}: {err}") from err
            warnings.warn(f"{err}; falling back to the previous checkpoint, {candidates[i + 1].name}",
                          FormerkitWarning, stacklevel=2)
    return None
