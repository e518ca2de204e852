"""Putting checkpoint tensors into a model: checked first, then each read, converted and placed once.

A ``Source`` says how one model tensor is made from checkpoint tensors (their names and the
``hf_maps`` transform joining them). ``build_on_meta`` builds a model whose parameters are on
the meta device (no memory, no initialization); ``assign_weights`` fills it. A tensor the model
uses as stored (same dtype, on the CPU, not concatenated) becomes the parameter as it is: a
private, copy-on-write memory map of the file, read from disk when first used; any other is read
from its map straight into a new tensor of the requested dtype and device. Either way the
checkpoint is never held in memory beside the model. ``load_weights_into`` copies into a
model that already has weights (a training run resuming).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode

from formerkit.checkpoints.files import CheckpointTensors
from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, InputError
from formerkit.model import Transformer


@dataclass(frozen=True)
class Source:
    """How one model tensor is made: checkpoint tensor ``names`` joined by ``transform``.

    Transforms (see ``hf_maps``): ``copy`` and ``tied`` take the first tensor, ``t`` its
    transpose, ``unbatch`` drops a leading dimension of 1, ``cat`` concatenates along dim 0.
    """

    names: tuple[str, ...]
    transform: str = "copy"


def _parts(source: Source, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The parts of ``source`` as views in the model's layout: each transposed, squeezed or as stored."""
    parts = [tensors[n] for n in (source.names if source.transform == "cat" else source.names[:1])]
    if source.transform == "t":
        return [parts[0].t()]
    if source.transform == "unbatch":
        return [parts[0].squeeze(0)]  # (1, N, D) -> (N, D)
    return parts


def source_shape(source: Source, tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape of the tensor ``source`` makes, from the shapes of its parts (their data is not read)."""
    if isinstance(tensors, CheckpointTensors):  # shapes from the files' headers
        shapes = [tensors.shape(n) for n in source.names]
    else:
        shapes = [tuple(tensors[n].shape) for n in source.names]
    if source.transform == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if source.transform == "t":
        return shapes[0][::-1]
    if source.transform == "unbatch" and shapes[0][:1] == (1,):
        return shapes[0][1:]
    return shapes[0]


def build_tensor(source: Source, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, mapped: bool = False) -> torch.Tensor:
    """The tensor ``source`` makes, in ``dtype`` on ``device`` (default: the parts').

    With ``mapped`` (``tensors`` read from files by ``CheckpointTensors``), a part that needs
    neither a dtype nor a device change nor a concatenation is returned as it is: a view of
    the file's private memory map (transposed or squeezed as the transform says), read lazily,
    its pages copied only when written. Otherwise a new tensor is made in one copy.
    """
    parts = _parts(source, tensors)
    dtype, device = dtype or parts[0].dtype, torch.device(device or parts[0].device)
    if mapped and len(parts) == 1 and parts[0].dtype == dtype and parts[0].device == device:
        return parts[0]
    out = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype, device=device)
    start = 0
    for part in parts:  # cat: each part into its rows; otherwise the one (possibly transposed) part
        out[start:start + part.shape[0]].copy_(part)
        start += part.shape[0]
    return out


def _key(tensor: torch.Tensor) -> tuple:
    """What makes two state-dict entries one tensor: the same object on the meta device, else the same memory."""
    return ("object", id(tensor)) if tensor.is_meta else ("memory", tensor.data_ptr(), tuple(tensor.shape))


def tied_to(model: nn.Module) -> dict[str, str]:
    """Each name in ``model.state_dict()`` whose tensor aliases one listed earlier, mapped to that earlier name."""
    first: dict[tuple, str] = {}
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = _key(tensor)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def tied_names(model: nn.Module) -> set[str]:
    """Names in ``model.state_dict()`` whose tensor aliases one listed earlier (tied weights)."""
    return set(tied_to(model))


def check_shapes(own: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], tied: set[str],
                 source: Path) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped tensor of ``given`` against ``own``.

    ``own`` and ``given`` map names to shapes (the model's and the checkpoint's); ``tied`` names
    model tensors that alias another and so need no tensor of their own.
    """
    missing = [k for k in own if k not in given and k not in tied]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k}: file {tuple(v)}, model {tuple(own[k])}" for k, v in given.items()
              if k in own and tuple(v) != tuple(own[k])]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items) if label != 'wrong shapes' else '; '.join(items)}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", shapes))
                 if items]
        raise CheckpointError(f"weights in {source} do not match its config — " + " | ".join(parts))


def load_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` (formerkit names) into ``model``'s tensors, or raise CheckpointError listing every mismatch."""
    own = model.state_dict()
    check_shapes({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()},
                 tied_names(model), source)
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def load_target(dtype: torch.dtype | None,
                device: str | torch.device | None) -> tuple[torch.dtype | None, torch.device]:
    """Check the ``dtype`` and ``device`` a model is loaded to; return them, ``device`` defaulting to torch's default.

    Raises InputError for a dtype that is not a floating-point ``torch.dtype`` and for a
    device torch does not know or cannot allocate on here (the meta device included).
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16 or torch.float32, "
                         f"got {dtype!r}")
    if device is None:
        return dtype, torch.empty(0).device
    try:
        place = torch.device(device)
        torch.empty(0, device=place)
    except (RuntimeError, TypeError, AssertionError) as err:
        raise InputError(f"device={device!r} cannot hold the model here ({err}); pass device='cpu' or an available "
                         "accelerator") from err
    if place.type == "meta":
        raise InputError("device='meta' holds no values; load to 'cpu' or an accelerator")
    return dtype, place


class _SkipInitOnMeta(TorchFunctionMode):
    """Make initialization of meta tensors (``torch.nn.init`` functions, ``normal_``, ``uniform_``) a no-op.

    A meta tensor has no values to fill, yet torch runs ``normal_`` on one through its Python
    reference implementation, whose first use imports the compiler stack: seconds per process.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if (isinstance(target, torch.Tensor) and target.is_meta
                and (getattr(func, "__module__", None) == "torch.nn.init"
                     or func in (torch.Tensor.normal_, torch.Tensor.uniform_))):
            return target
        return func(*args, **kwargs)


def build_on_meta(cfg: ModelConfig) -> Transformer:
    """The model of ``cfg`` with every parameter on the meta device: names and shapes, no memory, no initialization.

    Each parameter moves to the meta device as its module registers it (only in this thread),
    before the module initializes it; buffers are computed as in a normal build, so the ones
    checkpoints do not hold (rotary frequencies, ALiBi slopes) are right without a checkpoint.
    """
    builder = threading.get_ident()

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != builder:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        with _SkipInitOnMeta():
            return Transformer(cfg)
    finally:
        handle.remove()


def native_sources(tensors: Mapping[str, torch.Tensor]) -> dict[str, Source]:
    """The sources of a checkpoint stored under formerkit's own names: each tensor as it is."""
    return {name: Source((name,)) for name in tensors}


def _tensor_at(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _set(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, tensor)


def assign_weights(model: Transformer, sources: Mapping[str, Source], tensors: Mapping[str, torch.Tensor],
                   path: Path, *, dtype: torch.dtype | None, device: torch.device) -> Transformer:
    """Fill ``model``, built on the meta device, from ``tensors``: each model tensor made as ``sources`` says.

    Everything is checked before a tensor is read (CheckpointError listing every mismatch).
    Floating tensors go to ``dtype`` (default: the model's own), all to ``device``, each read
    and converted once, or, from files and needing no change, used in place (``build_tensor``):
    such a parameter is the file's memory map, so the file must not be rewritten in place while
    the model lives (formerkit's own writes replace files atomically, which is safe). The model's
    buffers follow as ``Module.to`` moves them. Tied weights stay one tensor. Returns the model.
    """
    own = model.state_dict(keep_vars=True)
    aliases = tied_to(model)
    check_shapes({k: tuple(v.shape) for k, v in own.items()},
                 {k: source_shape(s, tensors) for k, s in sources.items()}, set(aliases), path)
    mapped = isinstance(tensors, CheckpointTensors)
    loaded = {}
    for name, source in sources.items():
        target = dtype if dtype is not None and own[name].is_floating_point() else own[name].dtype
        loaded[name] = build_tensor(source, tensors, dtype=target, device=device, mapped=mapped)
    model.load_state_dict(loaded, strict=False, assign=True)
    for name, first in aliases.items():
        _set(model, name, _tensor_at(model, first))
    model.to(device=device, dtype=dtype)  # the buffers, as Module.to converts them; the parameters are there
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"loading {path} left {', '.join(left)} without values: a formerkit bug, please "
                              "report it with the checkpoint's config")
    return model
