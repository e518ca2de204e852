"""Reading tensor files (safetensors, sharded safetensors, weights-only .bin) and writing safetensors.

``CheckpointTensors`` opens a checkpoint's weight files without reading them: safetensors
files are memory-mapped, so a tensor's bytes come from disk only when it is used, and a
loader that converts one tensor at a time never holds the file's contents and the model at once.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from formerkit.errors import CheckpointError
from formerkit.fileio import atomic_write, read_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (made contiguous, storage not shared) to a safetensors file atomically."""
    owned = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, str(tmp), metadata=metadata))


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the ways reading a weight file fails into CheckpointErrors naming the file."""
    try:
        yield
    except FileNotFoundError as err:
        raise CheckpointError(f"weight file {path} is missing") from err
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read weight file {path}: {err}") from err
    except Exception as err:  # weights_only unpickling refuses anything but tensors
        raise CheckpointError(f"refusing to read {path}: it holds more than tensors ({err})") from err


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A weights-only ``.bin`` file's tensors; memory-mapped when it is in torch's zip format."""
    with _reading(path):
        mmap = zipfile.is_zipfile(path)  # files of torch < 1.6's legacy format cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


def weight_files(directory: Path) -> list[Path]:
    """The files holding a checkpoint directory's tensors: one file, or the shards its index lists.

    Raises CheckpointError when the directory has no weights or its index lists no shard.
    """
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = sorted(set(read_json(path).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{path} has an empty weight_map")
        return [directory / shard for shard in shards]
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint directory by name, each read when it is looked up.

    A safetensors tensor is a memory map of its bytes in the file: looking one up reads
    nothing, using it (a copy, a cast) reads it, and the file's pages it brought in leave this
    process's memory with the tensor (each lookup opens the file anew: an open file handle
    would keep every page read through it mapped). Weights-only ``.bin`` files are opened with
    ``torch.load(weights_only=True, mmap=True)`` (read whole if they predate torch's zip
    format) and stay mapped while this object lives. Raises CheckpointError naming the file
    that is missing, unreadable, or holds more than tensors.
    """

    def __init__(self, directory: Path) -> None:
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        for path in weight_files(Path(directory)):
            if path.suffix == ".safetensors":
                with _reading(path), safe_open(str(path), framework="pt") as handle:
                    shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            else:
                self._bins[path] = _load_bin(path)
                shapes = {name: tuple(t.shape) for name, t in self._bins[path].items()}
            self._where.update(dict.fromkeys(shapes, path))
            self._shapes.update(shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, from the file's header (nothing is read)."""
        return self._shapes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._where[name]
        if path in self._bins:
            return self._bins[path][name]
        with _reading(path), safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards), by name; see ``CheckpointTensors``."""
    return dict(CheckpointTensors(directory))
