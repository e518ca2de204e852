"""Activation patching and ablation, batched: TransformerLens' ``patching`` functions, many patches per forward.

TransformerLens runs one forward per patched index (a layer and a position or head). Here the
corrupted batch is repeated once per index, each copy gets its own patch from a hook that writes
the clean activation into that copy's rows only, and up to ``batch_size`` rows run in one forward.
The metric is then called on each copy's logits, so it sees what TransformerLens' metric sees:
logits (batch, pos, vocab) of the corrupted batch with one patch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.interp.activations import ActivationCache
from formerkit.interp.names import get_act_name
from formerkit.interp.run import Hook, run_with_cache, run_with_hooks

Metric = Callable[[torch.Tensor], torch.Tensor]
Index = tuple[int, ...]  # (layer, *where): where indexes the activation after its batch dimension


def _where_pos(index: Index) -> tuple:
    return (index[1],)  # (B, T, d) at pos


def _where_pos_head(index: Index) -> tuple:
    return index[1], index[2]  # (B, T, H, D) at pos, head


def _where_head(index: Index) -> tuple:
    return slice(None), index[1]  # (B, T, H, D) at head, every pos


def _where_pattern_head(index: Index) -> tuple:
    return (index[1],)  # (B, H, T, S) at head


def _config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(model, "blocks", None) is None:
        raise InputError("activation patching needs a single-stack formerkit Transformer (with model.blocks)")
    return cfg


def _check_shapes(corrupted_tokens: torch.Tensor, clean_cache: ActivationCache, name: str) -> None:
    """InputError unless the clean activations at ``name`` have the corrupted tokens' batch and length."""
    if corrupted_tokens.dim() != 2:
        raise InputError(f"corrupted_tokens must be (batch, pos); got shape {tuple(corrupted_tokens.shape)}")
    clean = clean_cache[get_act_name(name, 0)]
    b, t = corrupted_tokens.shape
    clean_t = clean.shape[2] if name == "pattern" else clean.shape[1]
    if clean.shape[0] != b or clean_t != t:
        raise InputError(f"the clean cache's {get_act_name(name, 0)} has shape {tuple(clean.shape)}, which does not "
                         f"match corrupted_tokens of shape {tuple(corrupted_tokens.shape)} (batch, pos): patching "
                         "needs clean and corrupted runs of the same batch and number of tokens")


@torch.no_grad()
def _sweep(model: nn.Module, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache, patching_metric: Metric,
           name: str, grid: tuple[int, ...], where: Callable[[Index], tuple], batch_size: int) -> torch.Tensor:
    """The metric for every index of ``grid`` (n_layers, ...): clean ``name`` patched at ``where(index)``.

    Returns a float tensor of shape ``grid``.
    """
    _check_shapes(corrupted_tokens, clean_cache, name)
    b = corrupted_tokens.shape[0]
    indices = list(itertools.product(*map(range, grid)))
    copies = max(1, batch_size // b)
    out = torch.zeros(len(indices))
    for start in range(0, len(indices), copies):
        chunk = indices[start:start + copies]
        tokens = corrupted_tokens.repeat(len(chunk), 1)  # (copies * b, T): copy r is rows r*b .. r*b+b-1

        def patch(act: torch.Tensor, hook: Hook, chunk: list[Index] = chunk) -> torch.Tensor:
            act = act.clone()
            clean = clean_cache[hook.name]
            layer = int(hook.name.split(".")[1])
            for r, index in enumerate(chunk):
                if index[0] == layer:
                    sel = (slice(None), *where(index))
                    act[r * b:(r + 1) * b][sel] = clean[sel]
            return act

        layers = sorted({ix[0] for ix in chunk})
        logits = run_with_hooks(model, tokens, fwd_hooks=[(get_act_name(name, L), patch) for L in layers])
        for r in range(len(chunk)):  # logits (copies * b, T, V); the metric sees (b, T, V) per copy
            out[start + r] = torch.as_tensor(patching_metric(logits[r * b:(r + 1) * b])).float()
    return out.view(grid)


def get_act_patch_resid_pre(model: nn.Module, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache,
                            patching_metric: Metric, *, batch_size: int = 64) -> torch.Tensor:
    """Patch the clean residual stream entering each block at each position. Returns (n_layers, pos).

    ``batch_size`` bounds the rows (copies of the corrupted batch) of one forward; at least one copy runs.
    """
    grid = (_config(model).n_layers, corrupted_tokens.shape[-1])
    return _sweep(model, corrupted_tokens, clean_cache, patching_metric, "resid_pre", grid, _where_pos, batch_size)


def get_act_patch_resid_mid(model: nn.Module, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache,
                            patching_metric: Metric, *, batch_size: int = 64) -> torch.Tensor:
    """Patch the clean residual stream between attention and MLP at each layer and position. Returns (n_layers, pos)."""
    grid = (_config(model).n_layers, corrupted_tokens.shape[-1])
    return _sweep(model, corrupted_tokens, clean_cache, patching_metric, "resid_mid", grid, _where_pos, batch_size)


def get_act_patch_attn_out(model: nn.Module, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache,
                           patching_metric: Metric, *, batch_size: int = 64) -> torch.Tensor:
    """Patch the clean attention output of each layer at each position. Returns (n_layers, pos)."""
    grid = (_config(model).n_layers, corrupted_tokens.shape[-1])
    return _sweep(model, corrupted_tokens, clean_cache, patching_metric, "attn_out", grid, _where_pos, batch_size)


def get_act_patch_mlp_out(model: nn.Module, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache,
                          patching_metric: Metric, *, batch_size: int = 64) -> torch.Tensor:
    """Patch the clean MLP output of each layer at each position. Returns (n_layers, pos)."""
    grid = (_config(model).n_layers, corrupted_tokens.shape[-1])
    return _sweep(model, corrupted_tokens, clean_cache, patching_metric, "mlp_out", grid, _where_pos, batch_size)


def get_act_patch_attn_head_out_all_pos(model: nn.Module, corrupted_tokens: torch.Tensor,
                                        clean_cache: ActivationCache, patching_metric: Metric, *,
                                        batch_size: int = 64) -> torch.Tensor:
    """Patch each head's clean output (``hook_z``) at every position at once. Returns (n_layers, n_heads)."""
    cfg = _config(model)
    return _sweep(model, corrupted_tokens, clean_cache, patching_metric, "z", (cfg.n_layers, cfg.n_heads),
                  _where_head, batch_size)


def get_act_patch_attn_head_out_by_pos(model: nn.Module, corrupted_tokens: torch.Tensor,
                                       clean_cache: ActivationCache, patching_metric: Metric, *,
                                       batch_size: int = 64) -> torch.Tensor:
    """Patch each head's clean output (``hook_z``) at each position. Returns (n_layers, pos, n_heads)."""
    cfg = _config(model)
    grid = (cfg.n_layers, corrupted_tokens.shape[-1], cfg.n_heads)
    return _sweep(model, corrupted_tokens, clean_cache, patching_metric, "z", grid, _where_pos_head, batch_size)


def get_act_patch_attn_head_pattern_all_pos(model: nn.Module, corrupted_tokens: torch.Tensor,
                                            clean_cache: ActivationCache, patching_metric: Metric, *,
                                            batch_size: int = 64) -> torch.Tensor:
    """Patch each head's clean attention pattern (all positions). Returns (n_layers, n_heads)."""
    cfg = _config(model)
    return _sweep(model, corrupted_tokens, clean_cache, patching_metric, "pattern", (cfg.n_layers, cfg.n_heads),
                  _where_pattern_head, batch_size)


def get_act_patch_block_every(model: nn.Module, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache,
                              metric: Metric, *, batch_size: int = 64) -> torch.Tensor:
    """resid_pre, attn_out and mlp_out patching stacked. Returns (3, n_layers, pos)."""
    sweeps = (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)
    return torch.stack([f(model, corrupted_tokens, clean_cache, metric, batch_size=batch_size) for f in sweeps])


# ---- ablation ---------------------------------------------------------------------------

def _ablate(model: nn.Module, tokens: torch.Tensor, name: str, units: Sequence[tuple[int, int]], size: int,
            what: str, kind: str, mean_cache: ActivationCache | None) -> torch.Tensor:
    """Logits with unit ``i`` of the last axis but one (heads of z) or last axis (neurons) of ``name`` replaced."""
    if kind not in ("zero", "mean"):
        raise InputError(f'kind must be "zero" or "mean"; got {kind!r}')
    n_layers = _config(model).n_layers
    by_layer: dict[int, list[int]] = {}
    for layer, unit in units:
        if not 0 <= layer < n_layers:
            raise InputError(f"layer {layer} is out of range: the model has {n_layers} layers")
        if not 0 <= unit < size:
            raise InputError(f"{what} {unit} of layer {layer} is out of range: a layer has {size}")
        by_layer.setdefault(layer, []).append(unit)
    names = {get_act_name(name, layer): units for layer, units in by_layer.items()}
    if kind == "mean" and mean_cache is None:
        _, mean_cache = run_with_cache(model, tokens, names_filter=list(names))
    axis = -2 if name == "z" else -1  # z (B, T, H, D): a head; post (B, T, d_ff): a neuron

    def replace(act: torch.Tensor, hook: Hook) -> torch.Tensor:
        act = act.clone()
        idx = torch.tensor(names[hook.name])
        if kind == "zero":
            act.index_fill_(axis, idx, 0.0)
        else:  # the mean over batch and positions: (H, D) or (d_ff,)
            mean = mean_cache[hook.name].float().mean(dim=(0, 1)).to(act.dtype)
            act.index_copy_(axis, idx, mean.index_select(axis, idx).expand_as(act.index_select(axis, idx)))
        return act

    return run_with_hooks(model, tokens, fwd_hooks=[(n, replace) for n in names])


def ablate_heads(model: nn.Module, tokens: torch.Tensor, heads: Sequence[tuple[int, int]], kind: str = "zero",
                 mean_cache: ActivationCache | None = None) -> torch.Tensor:
    """Run ``tokens`` with the heads ``(layer, head)`` ablated at ``hook_z``. Returns the logits (B, T, vocab).

    kind "zero" sets the head's output to zero; "mean" to its mean over batch and positions in
    ``mean_cache`` (a cache of ``tokens`` computed here when not given).
    """
    return _ablate(model, tokens, "z", heads, _config(model).n_heads, "head", kind, mean_cache)


def ablate_neurons(model: nn.Module, tokens: torch.Tensor, neurons: Sequence[tuple[int, int]], kind: str = "zero",
                   mean_cache: ActivationCache | None = None) -> torch.Tensor:
    """Run ``tokens`` with the MLP neurons ``(layer, index)`` ablated at ``mlp.hook_post``. Returns the logits.

    kind "zero" or "mean" (over batch and positions of ``mean_cache``, computed from ``tokens`` when not given).
    """
    return _ablate(model, tokens, "post", neurons, _config(model).d_ff, "neuron", kind, mean_cache)
