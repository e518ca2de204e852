"""Reading tensor files (safetensors, sharded safetensors, weights-only .bin) and writing safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from formerkit.errors import CheckpointError
from formerkit.fileio import atomic_write, read_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (made contiguous, storage not shared) to a safetensors file atomically."""
    owned = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, str(tmp), metadata=metadata))


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
