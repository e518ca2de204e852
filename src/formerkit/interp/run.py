"""Running a model with hooks on its hook points, and with a cache of their activations.

These are functions, not ``Transformer`` methods: ``formerkit.model`` sits below ``formerkit.interp``
in the import layers (tests/test_layering.py), so the model cannot import them, even lazily.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.interp.activations import ActivationCache, closest_names
from formerkit.layers.hooks import HookPoint

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
HookFn = Callable[[torch.Tensor, "Hook"], torch.Tensor | None]
HookSpec = tuple[str | Callable[[str], bool], HookFn]


@dataclass(frozen=True)
class Hook:
    """What a hook function gets as its second argument: ``fn(activation, hook)`` reads ``hook.name``.

    TransformerLens passes its HookPoint there; code that reads ``hook.name`` works with either.
    """

    name: str
    module: HookPoint


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Return every HookPoint of ``model`` by its full name (``"blocks.0.attn.hook_pattern"``), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def select(points: dict[str, HookPoint], names_filter: NamesFilter) -> list[str]:
    """Return the names of ``points`` that ``names_filter`` asks for.

    None: all but the per-head ``hook_result`` points (computing them runs each attention output
    projection once per head, so they are stored only when named or chosen by a predicate, as
    TransformerLens stores them only with ``use_attn_result``); a string: that one name; a sequence:
    those names; a callable: the names it is true for.
    Raises InputError, before anything runs, for a named hook point the model does not have.
    """
    if names_filter is None:
        return [n for n in points if not n.endswith(".hook_result")]
    if callable(names_filter):
        return [n for n in points if names_filter(n)]
    wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    for name in wanted:
        if not isinstance(name, str):
            raise InputError(f"names_filter holds {name!r}; give hook names (strings), or one predicate")
        if name not in points:
            raise InputError(f'this model has no hook point "{name}"{closest_names(name, list(points))}')
    return list(dict.fromkeys(wanted))


def _layer_counts(model: nn.Module) -> dict[str, int]:
    """Number of blocks per stack prefix: {"": n} for one stack, {"encoder.": n, "decoder.": m} for two."""
    out = {}
    for prefix, owner in (("", model), ("encoder.", getattr(model, "encoder", None)),
                          ("decoder.", getattr(model, "decoder", None))):
        blocks = getattr(owner, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            out[prefix] = len(blocks)
    return out


def _model_result(out: Any) -> Any:
    """The logits of a ModelOutput, or its hidden states for a model without a head; anything else as it is."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    return getattr(out, "hidden_states", out)


@contextlib.contextmanager
def hooks(model: nn.Module, fwd_hooks: Sequence[HookSpec] = (),
          bwd_hooks: Sequence[HookSpec] = ()) -> Iterator[nn.Module]:
    """Register hooks on the model's hook points for the duration of a ``with`` block; yield the model.

    Each hook is ``(name_or_predicate, fn)``. Forward: ``fn(activation, hook)`` returns a tensor to
    replace the activation, or None to keep it. Backward: ``fn(grad, hook)`` gets the gradient of the
    loss with respect to the activation and returns a replacement gradient or None. Every hook is
    removed when the block ends, also when it raises. Unknown names raise InputError before any hook
    is registered.
    """
    points = hook_points(model)
    plan = [(n, fn, backward) for specs, backward in ((fwd_hooks, False), (bwd_hooks, True))
            for target, fn in specs for n in select(points, target)]
    handles = []
    try:
        for name, fn, backward in plan:
            hook = Hook(name, points[name])
            handles.append(points[name].register_forward_hook(_backward(fn, hook) if backward else _forward(fn, hook)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _forward(fn: HookFn, hook: Hook) -> Callable:
    def run(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return fn(output, hook)
    return run


def _backward(fn: HookFn, hook: Hook) -> Callable:
    def run(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:  # a tensor hook lives as long as the activation, i.e. this forward pass
            output.register_hook(lambda grad: fn(grad, hook))
    return run


def run_with_hooks(model: nn.Module, *args: Any, fwd_hooks: Sequence[HookSpec] = (),
                   bwd_hooks: Sequence[HookSpec] = (), **forward_kwargs: Any) -> Any:
    """Call ``model(*args, **forward_kwargs)`` with hooks registered (see ``hooks``), then remove them.

    Returns the output's logits, or its hidden states for a model without a head. Backward hooks
    fire when the caller runs ``backward`` on (something computed from) the returned tensor. For
    the whole ModelOutput (the loss, say), call the model inside ``with hooks(model, ...)``.
    """
    with hooks(model, fwd_hooks, bwd_hooks):
        return _model_result(model(*args, **forward_kwargs))


def run_with_cache(model: nn.Module, *args: Any, names_filter: NamesFilter = None, remove_batch_dim: bool = False,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   **forward_kwargs: Any) -> tuple[Any, ActivationCache]:
    """Call ``model(*args, **forward_kwargs)`` and store the activations of the hook points asked for.

    Only the hook points ``names_filter`` selects (see ``select``) get a hook, so nothing else is
    stored and attention layers without a stored ``hook_pattern`` keep their fast path. Stored
    tensors are detached, optionally moved to ``device`` and cast to ``dtype`` (floating tensors).
    Returns (the output's logits, or its hidden states for a model without a head; the ActivationCache,
    which holds ``model`` as ``cache.model`` for its residual-stream methods).
    """
    points = hook_points(model)
    names = select(points, names_filter)
    store: dict[str, torch.Tensor] = {}

    def save(output: torch.Tensor, hook: Hook) -> None:
        t = output.detach()
        if device is not None or (dtype is not None and t.is_floating_point()):
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        store[hook.name] = t

    with hooks(model, [(name, save) for name in names]):
        result = _model_result(model(*args, **forward_kwargs))
    cache = ActivationCache({n: store[n] for n in points if n in store}, _layer_counts(model), model)
    return result, cache.remove_batch_dim() if remove_batch_dim else cache
