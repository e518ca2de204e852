"""ActivationCache: the activations of one run, by full hook name or TransformerLens' short keys."""

from __future__ import annotations

import difflib
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.interp import decompose, resid
from formerkit.interp.names import STACKS, get_act_name, split_stack

Key = str | tuple


def closest_names(name: str, names: list[str], n: int = 3) -> str:
    """Return ``'; closest: "a", "b"'`` for the names nearest ``name``, or '' when none is near."""
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    return "; closest: " + ", ".join(f'"{c}"' for c in close) if close else ""


class ActivationCache(Mapping[str, torch.Tensor]):
    """A read-only mapping of full hook names (``"blocks.0.attn.hook_pattern"``) to tensors.

    It also takes TransformerLens' short keys: ``cache["pattern", 0]``, ``cache["resid_post", -1]``,
    ``cache["normalized", 0, "ln1"]``, ``cache["embed"]`` (see ``get_act_name``). An encoder-decoder
    model's names start with ``encoder.`` or ``decoder.``: its short keys name the stack as the
    layer type, ``cache["resid_post", 1, "encoder"]`` or ``cache["pattern", 0, "decoder.cross_attn"]``.

    ``n_layers`` maps a stack prefix ("" for a single-stack model, "encoder." / "decoder.") to its
    number of blocks, for negative layer indices. ``model`` is the model that ran (``run_with_cache``
    attaches it, as TransformerLens' cache holds its model): the residual-stream methods read its
    norms and unembedding. ``has_batch_dim`` is False after ``remove_batch_dim``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], n_layers: dict[str, int] | None = None,
                 model: nn.Module | None = None, has_batch_dim: bool = True) -> None:
        self._tensors = dict(tensors)
        self.n_layers = dict(n_layers or {})
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---- lookup -------------------------------------------------------------------------

    def resolve(self, key: Key) -> str:
        """Return the full hook name ``key`` stands for (it may be absent from the cache)."""
        if isinstance(key, str):
            return key if key in self._tensors else get_act_name(key)
        if not isinstance(key, tuple) or not 1 <= len(key) <= 3 or not isinstance(key[0], str):
            raise InputError(f"a cache key is a hook name or a tuple (name, layer[, layer_type]); got {key!r}")
        name, layer, layer_type = (*key, None, None)[:3]
        if layer is not None and layer < 0:
            prefix = split_stack(layer_type)[0]
            if prefix not in self.n_layers:
                raise InputError(f"cannot resolve layer {layer} of {key!r}: the cache does not know the number of "
                                 f"layers{' of that stack' if prefix else ''}")
            layer += self.n_layers[prefix]
        return get_act_name(name, layer, layer_type)

    def __getitem__(self, key: Key) -> torch.Tensor:
        full = self.resolve(key)
        if full in self._tensors:
            return self._tensors[full]
        stacked = [f"{s}.{full}" for s in STACKS if f"{s}.{full}" in self._tensors]
        if stacked:
            raise InputError(f"{key!r} is ambiguous in an encoder-decoder model: it is {' or '.join(stacked)}; "
                             f'name the stack, e.g. cache["resid_post", 0, "encoder"] or the full name')
        shown = f'"{full}"' if full == key else f'{key!r} (= "{full}")'
        raise InputError(f"no activation {shown} in this cache{closest_names(full, list(self._tensors))}")

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, tuple)):
            return False
        try:
            return self.resolve(key) in self._tensors
        except (InputError, ValueError, TypeError):
            return False

    def get(self, key: Key, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """Return the tensor for ``key`` (a full name or short key), or ``default`` when it is not held."""
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> KeysView[str]:
        """Return the full hook names held, in the model's module order."""
        return self._tensors.keys()

    def items(self) -> ItemsView[str, torch.Tensor]:
        """Return (full hook name, tensor) pairs."""
        return self._tensors.items()

    def values(self) -> ValuesView[torch.Tensor]:
        """Return the tensors."""
        return self._tensors.values()

    def __repr__(self) -> str:
        shown = ", ".join(list(self._tensors)[:4]) + (", ..." if len(self) > 4 else "")
        return f"ActivationCache({len(self)} activations: {shown})"

    # ---- new caches ---------------------------------------------------------------------

    def to(self, target: torch.device | str | torch.dtype) -> ActivationCache:
        """Return a new cache with every tensor moved to a device or cast to a floating dtype (others kept)."""
        if isinstance(target, torch.dtype):
            moved = {k: t.to(target) if t.is_floating_point() else t for k, t in self._tensors.items()}
        else:
            moved = {k: t.to(target) for k, t in self._tensors.items()}
        return ActivationCache(moved, self.n_layers, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """Return a new cache without the leading batch dimension: (1, T, d) -> (T, d).

        Raises InputError unless every tensor has batch size 1. (TransformerLens changes its cache
        in place; this returns a new one, like ``to``.)
        """
        bad = {k: tuple(t.shape) for k, t in self._tensors.items() if t.dim() == 0 or t.shape[0] != 1}
        if bad:
            name, shape = next(iter(bad.items()))
            raise InputError(f"remove_batch_dim needs a batch of 1; {name} has shape {shape}")
        return ActivationCache({k: t[0] for k, t in self._tensors.items()}, self.n_layers, self.model, False)

    # ---- the residual stream (TransformerLens' methods; the math is in formerkit.interp.resid) ----

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: resid.SliceInput = None, mlp_input: bool = False,
                          return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Return the residual stream entering each layer up to ``layer``: (components, batch, pos, d_model).

        Labels as TransformerLens: "0_pre", ("0_mid",) ..., "final_post". See ``resid.accumulated_resid``.
        """
        return resid.accumulated_resid(self, layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels)

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: resid.SliceInput = None, incl_embeds: bool = True,
                        return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Return the outputs that sum to the stream entering ``layer``: (components, batch, pos, d_model).

        Labels "embed", "pos_embed", "0_attn_out", "0_mlp_out", ... See ``resid.decompose_resid``.
        """
        return resid.decompose_resid(self, layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: resid.SliceInput = None,
                           apply_ln: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Return every head's write before ``layer``: (layer * heads, batch, pos, d_model), labels "L0H0", ...."""
        return resid.stack_head_results(self, layer, return_labels, incl_remainder, pos_slice, apply_ln)

    def stack_neuron_results(self, layer: int | None = -1, pos_slice: resid.SliceInput = None,
                             neuron_slice: resid.SliceInput = None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False,
                             mlp_input: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Return every neuron's write before ``layer``: (layer * neurons, batch, pos, d_model), labels "L0N0", ...."""
        return decompose.stack_neuron_results(self, layer, pos_slice, neuron_slice, return_labels, incl_remainder,
                                              apply_ln, mlp_input)

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: resid.SliceInput = None,
                                     return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Return every head, neuron, embedding and the biases entering ``layer``: (components, batch, pos, d_model).

        See ``decompose.get_full_resid_decomposition``.
        """
        return decompose.get_full_resid_decomposition(self, layer, mlp_input, expand_neurons, apply_ln, pos_slice,
                                                      return_labels)

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: resid.SliceInput = None, batch_slice: resid.SliceInput = None,
                          has_batch_dim: bool = True, recompute_ln: bool = False) -> torch.Tensor:
        """Return ``residual_stack`` divided by the cached norm scale of ``layer``'s input (centred for LayerNorm)."""
        return resid.apply_ln_to_stack(self, residual_stack, layer, mlp_input, pos_slice, batch_slice,
                                       has_batch_dim, recompute_ln)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: int | torch.Tensor,
                    incorrect_tokens: int | torch.Tensor | None = None, pos_slice: resid.SliceInput = None,
                    batch_slice: resid.SliceInput = None, has_batch_dim: bool = True) -> torch.Tensor:
        """Return each component's projection on the unembedding of ``tokens``: (components, batch, pos)."""
        return resid.logit_attrs(self, residual_stack, tokens, incorrect_tokens, pos_slice, batch_slice,
                                 has_batch_dim)
