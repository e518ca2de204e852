"""Reading tensor files (safetensors, sharded safetensors, weights-only .bin) and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from formerkit.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (made contiguous, storage not shared) to a safetensors file atomically."""
    owned = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, str(tmp), metadata=metadata))


def read_json(path: Path) -> dict:
    """Read a JSON object from ``path``, raising CheckpointError on a missing or broken file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} does not exist") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"weight file {path} is missing") from err
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read weight file {path}: {err}") from err
    except Exception as err:  # weights_only unpickling refuses anything but tensors
        raise CheckpointError(f"refusing to read {path}: it holds more than tensors ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint directory: single file or sharded with an index."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_json(path)
            shards = sorted(set(index.get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{path} has an empty weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_one(directory / shard))
            return state
        return _read_one(path)
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")
