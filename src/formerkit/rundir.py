"""Where a checkpoint directory keeps its config and a training run its checkpoints.

A native checkpoint holds ``formerkit_config.json``. A training run directory keeps one
directory per saved step under ``checkpoints/`` and a one-line ``checkpoints/latest`` naming
the newest; wherever a checkpoint directory is expected, a run directory stands for that one.
"""

from __future__ import annotations

from pathlib import Path

from formerkit.errors import CheckpointError

NATIVE_CONFIG = "formerkit_config.json"


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The directory holding a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def latest_pointer(run_dir: str | Path) -> Path:
    """The file naming a run's newest checkpoint (it exists only in a run directory that saved one)."""
    return checkpoints_dir(run_dir) / "latest"


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or a training run's latest checkpoint.

    Raises CheckpointError when ``path`` is not a directory or its ``latest`` names a step that is gone.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    pointer = latest_pointer(directory)
    if pointer.is_file() and not (directory / NATIVE_CONFIG).is_file():
        latest = checkpoints_dir(directory) / pointer.read_text().strip()
        if not latest.is_dir():
            raise CheckpointError(f"{pointer} names {latest.name}, which does not exist")
        return latest
    return directory
