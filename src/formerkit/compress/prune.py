"""Structured pruning: remove attention heads and feed-forward neurons, leaving a physically smaller model.

Importance follows Michel et al. (2019), "Are Sixteen Heads Really Better than One?": every head's
output ``z`` (``attn.hook_z``) is multiplied by a gate of ones, and a head's importance is
``|d loss / d gate|`` summed over batches (one absolute value per batch). Feed-forward neurons get
the same score through a gate on ``mlp.hook_post``. ``prune_heads`` and ``prune_neurons`` slice the
weights (``qkv``/``out``, ``fc_in``/``fc_gate``/``fc_out``) and write per-layer ``n_heads``,
``n_kv_heads`` and ``d_ff`` lists into the config, so the result saves and reloads as an ordinary
native checkpoint. ``prune`` removes the least important units step by step to a kept fraction,
scoring the model again before each step.

Grouped-query attention: the query heads that remain must share their key/value heads evenly.
``prune_heads`` accepts any removal that leaves every surviving key/value group the same number of
query heads (a group whose query heads all go is removed with its key/value head); ``prune``
removes whole key/value groups (single heads under plain multi-head attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.layers.linear import Linear
from formerkit.model import Transformer

Batch = Mapping[str, torch.Tensor]  # keyword arguments of the model, labels included (it returns a loss)


def _blocks(model: Transformer) -> nn.ModuleList:
    """The blocks of a single-stack (decoder or encoder) model; InputError for an encoder-decoder."""
    if model.config.kind == "encoder-decoder":
        raise InputError("pruning handles decoder and encoder models; an encoder-decoder's stacks are not supported")
    return model.blocks


def _check_dense(blocks: nn.ModuleList) -> None:
    """InputError when a layer's feed-forward is a mixture of experts, whose neurons belong to no one layer's d_ff."""
    sparse = [i for i, block in enumerate(blocks) if not hasattr(block.mlp, "fc_out")]
    if sparse:
        raise InputError(f"layers {sparse} are mixtures of experts; their neurons cannot be scored or pruned "
                         "(prune heads only)")


@dataclass
class Importance:
    """Gate-gradient importance per layer: ``heads[i]`` (n_heads_i,) and ``neurons[i]`` (d_ff_i,), or None."""

    heads: list[torch.Tensor] | None
    neurons: list[torch.Tensor] | None


@contextlib.contextmanager
def _gates(model: Transformer, heads: bool, neurons: bool) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Multiply each head's z and each neuron's activation by a gate of ones that requires grad, while inside."""
    head_gates, neuron_gates, handles = [], [], []
    weight = next(model.parameters())
    if neurons:
        _check_dense(_blocks(model))
    for block in _blocks(model):
        if heads:
            gate = torch.ones(block.attn.n_heads, dtype=weight.dtype, device=weight.device, requires_grad=True)
            head_gates.append(gate)  # z is (B, T, H, D): one gate per head
            handles.append(block.attn.hook_z.register_forward_hook(
                lambda m, i, z, g=gate: z * g.view(1, 1, -1, 1)))
        if neurons:
            gate = torch.ones(block.mlp.fc_out.in_features, dtype=weight.dtype, device=weight.device,
                              requires_grad=True)
            neuron_gates.append(gate)  # post is (B, T, d_ff): one gate per neuron
            handles.append(block.mlp.hook_post.register_forward_hook(lambda m, i, post, g=gate: post * g))
    try:
        yield head_gates, neuron_gates
    finally:
        for handle in handles:
            handle.remove()


def importance(model: Transformer, batches: Iterable[Batch], *, heads: bool = True, neurons: bool = True,
               normalize: bool = False) -> Importance:
    """Michel et al.'s importance: ``|d loss / d gate|`` of each head (and/or neuron) gate, summed over batches.

    Each batch is a dict of the model's keyword arguments with ``labels``. The model runs in eval
    mode (no dropout); its parameters get no gradients. ``normalize`` divides each layer's scores by
    their L2 norm (Michel et al., so that layers compare). Returns an ``Importance``.
    """
    blocks = _blocks(model)
    was_training = model.training
    model.eval()
    head_sum = [torch.zeros(b.attn.n_heads) for b in blocks] if heads else None
    neuron_sum = [torch.zeros(b.mlp.fc_out.in_features) for b in blocks] if neurons else None
    seen = 0
    try:
        with _gates(model, heads, neurons) as (head_gates, neuron_gates):
            gates = head_gates + neuron_gates
            for batch in batches:
                loss = model(**batch).loss
                if loss is None:
                    raise InputError("importance needs a loss: give each batch its labels (labels=...)")
                grads = torch.autograd.grad(loss, gates)
                for total, grad in zip((head_sum or []) + (neuron_sum or []), grads, strict=True):
                    total += grad.detach().abs().float().cpu()
                seen += 1
    finally:
        model.train(was_training)
    if not seen:
        raise InputError("importance needs at least one batch")
    if normalize:
        for scores in (head_sum or []) + (neuron_sum or []):
            scores /= scores.norm().clamp(min=1e-20)
    return Importance(head_sum, neuron_sum)


def _sliced(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> Linear:
    """A new ``Linear`` holding the given output rows and input columns of ``layer``'s weight (and bias)."""
    if type(layer) not in (nn.Linear, Linear):
        raise InputError(f"cannot prune a {type(layer).__name__} layer; prune before quantizing or adding adapters")
    weight = layer.weight.detach()  # (out, in)
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    new = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(layer.training)
    new.requires_grad_(layer.weight.requires_grad)
    return new


def _layer_map(selection: Mapping[int, Iterable[int]], sizes: list[int], what: str
               ) -> dict[int, list[int]]:
    """Check ``{layer: [index, ...]}`` against the layer sizes; return it with sorted distinct indices."""
    out = {}
    for layer, indices in selection.items():
        if not isinstance(layer, int) or not 0 <= layer < len(sizes):
            raise InputError(f"layer {layer!r} does not exist; the model has layers 0..{len(sizes) - 1}")
        chosen = sorted({int(i) for i in indices})
        outside = [i for i in chosen if not 0 <= i < sizes[layer]]
        if outside:
            raise InputError(f"layer {layer} has {what}s 0..{sizes[layer] - 1}; {outside} do not exist")
        if len(chosen) == sizes[layer]:
            raise InputError(f"pruning all {sizes[layer]} {what}s of layer {layer} would cut the layer; keep at "
                             f"least one")
        if chosen:
            out[layer] = chosen
    return out


def _per_layer(sizes: list[int]) -> int | list[int]:
    """A config's size field: one integer when every layer has the same size, else the per-layer list."""
    return sizes[0] if len(set(sizes)) == 1 else sizes


def _kept(n: int, removed: list[int], device: torch.device) -> torch.Tensor:
    drop = set(removed)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long, device=device)


def _groups_left(attn: nn.Module, layer: int, removed: list[int]) -> list[int]:
    """Query heads left in each key/value group of one layer; InputError when the groups would be uneven."""
    group = attn.n_heads // attn.n_kv_heads
    left = [group - sum(1 for h in removed if h // group == g) for g in range(attn.n_kv_heads)]
    if len({n for n in left if n}) > 1:
        raise InputError(f"removing query heads {removed} of layer {layer} leaves key/value groups of {left} query "
                         f"heads; grouped-query attention needs equal groups: remove the same number from each "
                         f"group (of {group}: heads g*{group}..g*{group}+{group - 1}) or whole groups")
    return left


def _prune_attention(attn: nn.Module, removed: list[int], left: list[int]) -> None:
    """Remove query heads ``removed`` from one self-attention layer, and the key/value groups ``left`` empty."""
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.d_head
    device = attn.qkv.weight.device
    q = _kept(H, removed, device)  # (H',)
    kv = _kept(KV, [g for g in range(KV) if not left[g]], device)  # (KV',)
    per_head = lambda heads: (heads[:, None] * D + torch.arange(D, device=device)).reshape(-1)  # noqa: E731
    rows = torch.cat([per_head(q), H * D + per_head(kv), (H + KV) * D + per_head(kv)])  # rows of [q | k | v]
    attn.qkv = _sliced(attn.qkv, rows=rows)
    attn.out = _sliced(attn.out, cols=per_head(q))
    if attn.gate is not None:  # gated attention: one gate logit per query head
        attn.gate = _sliced(attn.gate, rows=q)
    attn.n_heads, attn.n_kv_heads = len(q), len(kv)


def prune_heads(model: Transformer, heads: Mapping[int, Iterable[int]]) -> Transformer:
    """Remove attention heads in place: ``{layer: [head, ...]}``; returns the model, its config updated.

    The heads' rows of ``attn.qkv`` and columns of ``attn.out`` go; ``n_heads`` (and, under
    grouped-query attention, ``n_kv_heads``) become per-layer lists (one integer when every layer
    has the same count) and ``d_head`` is fixed.
    Removing every head of a layer, or an uneven share of grouped-query groups, is an InputError.
    """
    blocks = _blocks(model)
    cfg = model.config
    if cfg.position in ("alibi", "relative"):
        raise InputError(f"heads of a position={cfg.position!r} model cannot be pruned: its per-head slopes/bias are "
                         "shared by every layer (neurons can be)")
    selection = _layer_map(heads, [b.attn.n_heads for b in blocks], "head")
    if not selection:
        return model
    left = {layer: _groups_left(blocks[layer].attn, layer, removed) for layer, removed in selection.items()}
    for layer, removed in selection.items():  # every layer checked before any is changed
        _prune_attention(blocks[layer].attn, removed, left[layer])
    n_heads = [b.attn.n_heads for b in blocks]
    n_kv = [b.attn.n_kv_heads for b in blocks]
    model.config = cfg.replace(n_heads=_per_layer(n_heads), d_head=cfg.head_dim,
                               n_kv_heads=None if n_kv == n_heads and cfg.n_kv_heads is None else _per_layer(n_kv))
    return model


def prune_neurons(model: Transformer, neurons: Mapping[int, Iterable[int]]) -> Transformer:
    """Remove feed-forward neurons in place: ``{layer: [neuron, ...]}``; returns the model, its config updated.

    The neurons' rows of ``fc_in`` (and ``fc_gate``) and columns of ``fc_out`` go; ``d_ff`` becomes
    a per-layer list (one integer when every layer has the same width). Removing every neuron of a
    layer is an InputError.
    """
    blocks = _blocks(model)
    _check_dense(blocks)
    selection = _layer_map(neurons, [b.mlp.fc_out.in_features for b in blocks], "neuron")
    if not selection:
        return model
    for layer, removed in selection.items():
        mlp = blocks[layer].mlp
        keep = _kept(mlp.fc_out.in_features, removed, mlp.fc_out.weight.device)  # (d_ff',)
        mlp.fc_in = _sliced(mlp.fc_in, rows=keep)
        if mlp.fc_gate is not None:
            mlp.fc_gate = _sliced(mlp.fc_gate, rows=keep)
        mlp.fc_out = _sliced(mlp.fc_out, cols=keep)
    model.config = model.config.replace(d_ff=_per_layer([b.mlp.fc_out.in_features for b in blocks]))
    return model


def _units(blocks: nn.ModuleList, scores: list[torch.Tensor], heads: bool) -> list[tuple[float, int, list[int], int]]:
    """Prunable units (score, layer, indices, size): neurons, or key/value groups of query heads (summed scores)."""
    units = []
    for layer, (block, layer_scores) in enumerate(zip(blocks, scores, strict=True)):
        group = block.attn.n_heads // block.attn.n_kv_heads if heads else 1
        for start in range(0, len(layer_scores), group):
            members = list(range(start, start + group))
            units.append((float(layer_scores[start:start + group].sum()), layer, members, group))
    return units


def _lowest(units: list[tuple[float, int, list[int], int]], remove: int, sizes: list[int]) -> dict[int, list[int]]:
    """The least important units adding up to ``remove`` heads/neurons, keeping at least one unit per layer."""
    left = list(sizes)
    chosen: dict[int, list[int]] = {}
    for _, layer, members, size in sorted(units, key=lambda u: u[0]):
        if remove < size:
            break
        if left[layer] - size < 1:
            continue
        chosen.setdefault(layer, []).extend(members)
        left[layer] -= size
        remove -= size
    return chosen


def prune(model: Transformer, batches: list[Batch], *, heads: float = 1.0, neurons: float = 1.0,
          steps: int = 4) -> Transformer:
    """Prune in place to keep a fraction ``heads`` of the query heads and ``neurons`` of the neurons.

    In ``steps`` equal steps, each step scores the model again (``importance``, normalized per
    layer, over ``batches``) and removes the globally least important units: key/value groups of
    query heads and single neurons. Every layer keeps at least one of each. Returns the model.
    """
    for name, value in (("heads", heads), ("neurons", neurons)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise InputError(f"{name} must be a kept fraction in (0, 1], got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    blocks = _blocks(model)
    total_heads = sum(b.attn.n_heads for b in blocks)
    total_neurons = sum(b.mlp.fc_out.in_features for b in blocks)
    for step in range(1, steps + 1):
        head_target = round(total_heads * (1 - (1 - heads) * step / steps))
        neuron_target = round(total_neurons * (1 - (1 - neurons) * step / steps))
        head_sizes = [b.attn.n_heads for b in blocks]
        neuron_sizes = [b.mlp.fc_out.in_features for b in blocks]
        want_heads, want_neurons = sum(head_sizes) > head_target, sum(neuron_sizes) > neuron_target
        if not (want_heads or want_neurons):
            continue
        scores = importance(model, batches, heads=want_heads, neurons=want_neurons, normalize=True)
        if want_heads:
            units = _units(blocks, scores.heads, heads=True)
            prune_heads(model, _lowest(units, sum(head_sizes) - head_target, head_sizes))
        if want_neurons:
            units = _units(blocks, scores.neurons, heads=False)
            prune_neurons(model, _lowest(units, sum(neuron_sizes) - neuron_target, neuron_sizes))
    return model
