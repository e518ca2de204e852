"""The residual stream of a decoder-only run: accumulated, decomposed, normalized, projected on logits.

These are the math behind ``ActivationCache.accumulated_resid``, ``decompose_resid``,
``apply_ln_to_stack`` and ``logit_attrs`` (TransformerLens' names, arguments and labels), and
``logit_lens``. Each takes the cache first; the cache's ``model`` (attached by ``run_with_cache``)
supplies the norms and the unembedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.layers.norm import LayerNorm

SliceInput = int | tuple | slice | Sequence[int] | torch.Tensor | None


class ActivationCache(Protocol):
    """What these functions read of ``formerkit.interp.ActivationCache`` (which imports this module)."""

    model: nn.Module | None
    n_layers: dict[str, int]
    has_batch_dim: bool

    def __getitem__(self, key: str | tuple) -> torch.Tensor: ...

    def __contains__(self, key: object) -> bool: ...


def apply_slice(t: torch.Tensor, s: SliceInput, dim: int) -> torch.Tensor:
    """Index ``t`` along ``dim`` as TransformerLens' ``Slice`` does.

    None: all; an int: that index (the dim is dropped); a tuple: ``slice(*s)``; a slice; a list or
    tensor of indices.
    """
    if s is None:
        return t
    if isinstance(s, int):
        return t.select(dim, s)
    if isinstance(s, tuple):
        s = slice(*s)
    if isinstance(s, slice):
        return t[(slice(None),) * (dim % t.dim()) + (s,)]
    return t.index_select(dim, torch.as_tensor(s, device=t.device).long())


def _model(cache: ActivationCache) -> nn.Module:
    """The cache's model, checked to be a single-stack model."""
    if cache.model is None:
        raise InputError("this cache holds no model; make it with formerkit.interp.run_with_cache")
    if "" not in cache.n_layers:
        raise InputError("residual-stream analysis covers single-stack models; this one has an encoder and decoder")
    return cache.model


def _final_layer(cache: ActivationCache, layer: int | None) -> int:
    """``layer`` with None and -1 meaning n_layers (the unembed), as in TransformerLens."""
    n = cache.n_layers[""]
    if layer is None or layer == -1:
        return n
    if not 0 <= layer <= n:
        raise InputError(f"layer must be in [0, {n}] (or None/-1 for the unembed), got {layer}")
    return layer


def _stack(cache: ActivationCache, names: list[str], pos_slice: SliceInput) -> torch.Tensor:
    return torch.stack([apply_slice(cache[n], pos_slice, -2) for n in names])


def accumulated_resid(cache: ActivationCache, layer: int | None = None, incl_mid: bool = False,
                      apply_ln: bool = False, pos_slice: SliceInput = None, mlp_input: bool = False,
                      return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
    """Return the residual stream entering layers 0..``layer``, stacked: (components, batch, pos, d_model).

    ``layer`` None/-1/n_layers ends with the last block's output ("final_post"); ``incl_mid`` adds
    each earlier layer's stream after attention ("{l}_mid"); ``mlp_input`` adds ``layer``'s own.
    ``apply_ln`` at the unembed applies the final norm to each component with its own statistics
    (a logit lens); at a block it divides by that block's cached norm scale (centred for LayerNorm).
    With ``return_labels``, returns (stack, labels).
    """
    _model(cache)
    layer = _final_layer(cache, layer)
    n = cache.n_layers[""]
    names, labels = [], []
    for i in range(layer + 1):
        if i == n:
            names.append(f"blocks.{n - 1}.hook_resid_post")
            labels.append("final_post")
            continue
        names.append(f"blocks.{i}.hook_resid_pre")
        labels.append(f"{i}_pre")
        if (incl_mid and i < layer) or (mlp_input and i == layer):
            names.append(f"blocks.{i}.hook_resid_mid")
            labels.append(f"{i}_mid")
    out = _stack(cache, names, pos_slice)
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer, mlp_input, pos_slice, has_batch_dim=cache.has_batch_dim,
                                recompute_ln=layer == n)
    return (out, labels) if return_labels else out


def decompose_resid(cache: ActivationCache, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                    apply_ln: bool = False, pos_slice: SliceInput = None, incl_embeds: bool = True,
                    return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
    """Return the outputs that sum to the stream entering ``layer``: (components, batch, pos, d_model).

    Components: "embed", "pos_embed" (when cached and ``incl_embeds``), then "{l}_attn_out" and
    "{l}_mlp_out" of every earlier layer (``mode`` "attn" or "mlp" keeps one kind), and with
    ``mlp_input`` ``layer``'s own attention output. ``apply_ln`` divides by the cached norm scale
    of ``layer``'s input. With ``return_labels``, returns (stack, labels).
    """
    if mode not in ("all", "attn", "mlp"):
        raise InputError(f'mode must be "all", "attn" or "mlp", got {mode!r}')
    _model(cache)
    layer = _final_layer(cache, layer)
    names, labels = [], []
    if incl_embeds:
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in cache:
                names.append(name)
                labels.append(label)
    for i in range(layer):
        for kind in ("attn", "mlp"):
            if mode in ("all", kind):
                names.append(f"blocks.{i}.hook_{kind}_out")
                labels.append(f"{i}_{kind}_out")
    if mlp_input and mode != "mlp":
        names.append(f"blocks.{layer}.hook_attn_out")
        labels.append(f"{layer}_attn_out")
    out = _stack(cache, names, pos_slice)
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer, mlp_input, pos_slice)
    return (out, labels) if return_labels else out


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight a projection applies: an ``nn.Linear``'s own, else read off the module itself.

    Any other linear module (int8 or int4 weights, LoRA adapters) is probed with the identity:
    ``linear(I) - linear(0)`` holds its columns, so what is returned is what it computes.
    """
    if isinstance(linear, nn.Linear):
        return linear.weight
    probe = next(linear.parameters(), None)
    probe = probe if probe is not None else next(linear.buffers())
    eye = torch.eye(linear.in_features, device=probe.device)
    with torch.no_grad():
        return (linear(eye) - linear(torch.zeros_like(eye[:1]))).float().T  # (out, in)


def output_bias(linear: nn.Module) -> torch.Tensor | None:
    """The bias (out,) a projection adds: an ``nn.Linear``'s own (None without one), else ``linear(0)``."""
    if isinstance(linear, nn.Linear):
        return linear.bias
    with torch.no_grad():
        return linear(torch.zeros(1, linear.in_features, device=dense_weight(linear).device))[0].float()


def head_results(cache: ActivationCache, layer: int) -> torch.Tensor:
    """Return each head's write to the stream in ``layer``: (batch, pos, heads, d_model).

    That is ``hook_z`` of the head through its slice of W_O; the output bias is not included (it
    belongs to no head), as in TransformerLens' ``hook_result``.
    """
    attn = _model(cache).blocks[layer].attn
    z = cache[f"blocks.{layer}.attn.hook_z"]  # ([batch,] pos, heads, d_head)
    w_o = dense_weight(attn.out).view(-1, attn.n_heads, attn.d_head)  # (d_model, heads, d_head)
    return torch.einsum("...hd,mhd->...hm", z, w_o.to(z.dtype))


def stack_head_results(cache: ActivationCache, layer: int | None = -1, return_labels: bool = False,
                       incl_remainder: bool = False, pos_slice: SliceInput = None,
                       apply_ln: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
    """Return the write of every head before ``layer``: (layer * heads [+ 1], batch, pos, d_model).

    Labels "L0H0", "L0H1", ...; ``incl_remainder`` adds "remainder", the rest of the stream entering
    ``layer`` (embeddings, MLPs, output biases). ``apply_ln`` divides by the cached norm scale of
    ``layer``'s input. With ``return_labels``, returns (stack, labels).
    """
    layer = _final_layer(cache, layer)
    parts = [apply_slice(head_results(cache, i), pos_slice, -3).movedim(-2, 0) for i in range(layer)]
    labels = [f"L{i}H{h}" for i in range(layer) for h in range(parts[0].shape[0] if parts else 0)]
    out = finish_stack(cache, parts, labels, layer, incl_remainder, apply_ln, False, pos_slice)
    return (out, labels) if return_labels else out


def finish_stack(cache: ActivationCache, parts: list[torch.Tensor], labels: list[str], layer: int,
                 incl_remainder: bool, apply_ln: bool, mlp_input: bool, pos_slice: SliceInput) -> torch.Tensor:
    """Concatenate per-layer component stacks (each (n, [batch,] pos, d_model)) into one; returns it.

    ``incl_remainder`` appends (and labels) the rest of the stream entering ``layer`` (its MLP with
    ``mlp_input``); ``apply_ln`` divides by the cached norm scale there. No parts: an empty stack.
    """
    if incl_remainder:
        entering = (f"blocks.{layer}.hook_resid_mid" if mlp_input else
                    f"blocks.{layer - 1}.hook_resid_post" if layer else "blocks.0.hook_resid_pre")
        stream = apply_slice(cache[entering], pos_slice, -2)
        parts = [*parts, (stream - sum(p.sum(0) for p in parts))[None]]
        labels.append("remainder")
    if parts:
        out = torch.cat(parts)
    else:
        embed = apply_slice(cache["hook_embed"], pos_slice, -2)
        out = embed.new_zeros(0, *embed.shape)
    return apply_ln_to_stack(cache, out, layer, mlp_input, pos_slice) if apply_ln else out


def apply_ln_to_stack(cache: ActivationCache, residual_stack: torch.Tensor, layer: int | None = None,
                      mlp_input: bool = False, pos_slice: SliceInput = None, batch_slice: SliceInput = None,
                      has_batch_dim: bool = True, recompute_ln: bool = False) -> torch.Tensor:
    """Return ``residual_stack`` (components, [batch,] [pos,] d_model) as the input of ``layer``'s norm sees it.

    Each component is centred (LayerNorm) and divided by the norm's scale cached in the run
    (``hook_scale``), so the components still sum to the normalized stream; the norm's weight and
    bias are not applied, as in TransformerLens. ``layer`` None/-1/n_layers is the final norm;
    ``mlp_input`` takes ``ln2`` over ``ln1``. ``recompute_ln`` at the final norm applies the whole
    norm to each component with its own statistics instead. ``pos_slice`` and ``batch_slice`` say
    which part of the cached scale the stack covers; ``batch_slice`` is also applied to the stack.
    A model without that norm returns the stack (batch-sliced) as it is.
    """
    model = _model(cache)
    layer = _final_layer(cache, layer)
    final = layer == cache.n_layers[""]
    if has_batch_dim:
        residual_stack = apply_slice(residual_stack, batch_slice, 1)
    if final:
        norm, key = getattr(model, "ln_final", None), "ln_final.hook_scale"
    else:
        ln = "ln2" if mlp_input else "ln1"
        norm, key = getattr(model.blocks[layer], ln, None), f"blocks.{layer}.{ln}.hook_scale"
    if norm is None:
        return residual_stack
    if recompute_ln and final:
        return norm(residual_stack)
    if key not in cache:
        raise InputError(f'apply_ln needs "{key}" in the cache; run_with_cache with it in names_filter')
    if isinstance(norm, LayerNorm):
        residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
    scale = apply_slice(cache[key], pos_slice, -2)  # ([batch,] [pos,] 1)
    if cache.has_batch_dim:
        scale = apply_slice(scale, batch_slice, 0)
    return residual_stack / scale


def unembed_directions(model: nn.Module, tokens: int | torch.Tensor) -> torch.Tensor:
    """Return the unembedding rows of ``tokens``: (*tokens.shape, d_model) (TL's ``tokens_to_residual_directions``)."""
    head = getattr(model, "lm_head", None)
    if head is None or head.dense is not None:
        raise InputError("logit attribution needs a model whose LM head is one projection (a causal LM head)")
    weight = head.proj.weight  # (vocab, d_model)
    if head.scale is not None:
        weight = weight * head.scale
    if isinstance(tokens, str):
        raise InputError("the cache has no tokenizer: give token ids, not strings")
    return weight[torch.as_tensor(tokens, device=weight.device).long()]


def logit_attrs(cache: ActivationCache, residual_stack: torch.Tensor, tokens: int | torch.Tensor,
                incorrect_tokens: int | torch.Tensor | None = None, pos_slice: SliceInput = None,
                batch_slice: SliceInput = None, has_batch_dim: bool = True) -> torch.Tensor:
    """Return each component's contribution to the logit of ``tokens``: (components, [batch,] [pos]).

    The stack is divided by the final norm's cached scale (``apply_ln_to_stack`` at the unembed)
    and dotted with the unembedding rows of ``tokens``, or of ``tokens`` minus ``incorrect_tokens``
    (same shape). ``tokens``: an int, (batch,) (one per example, shared by positions), or
    (batch, pos); the unembedding bias is not included, as in TransformerLens.
    """
    model = _model(cache)
    directions = unembed_directions(model, tokens)
    if incorrect_tokens is not None:
        if torch.as_tensor(tokens).shape != torch.as_tensor(incorrect_tokens).shape:
            raise InputError("tokens and incorrect_tokens must have the same shape")
        directions = directions - unembed_directions(model, incorrect_tokens)
    scaled = apply_ln_to_stack(cache, residual_stack, None, False, pos_slice, batch_slice, has_batch_dim)
    if (has_batch_dim and not isinstance(batch_slice, int) and scaled.dim() == 4 and directions.dim() == 2
            and directions.shape[0] == scaled.shape[1]):
        directions = directions.unsqueeze(-2)  # per-example directions broadcast over positions
    return (scaled * directions.to(scaled.dtype)).sum(-1)


def logit_lens(model: nn.Module, cache: ActivationCache, layer: int | None = None, incl_mid: bool = False,
               pos_slice: SliceInput = None) -> tuple[torch.Tensor, list[str]]:
    """Return the logits each layer's residual stream would give: ((components, batch, pos, vocab), labels).

    The stream entering each layer (``accumulated_resid``, labels "0_pre", ..., "final_post") goes
    through the final norm, with its own statistics, and the LM head; the "final_post" row is the
    model's logits.
    """
    if getattr(model, "lm_head", None) is None:
        raise InputError("the logit lens needs a model with an LM head")
    stack, labels = accumulated_resid(cache, layer, incl_mid, pos_slice=pos_slice, return_labels=True)
    norm = getattr(model, "ln_final", None)
    with torch.no_grad():
        return model.lm_head(norm(stack) if norm is not None else stack), labels


def top_tokens(logits: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``k`` most likely tokens of logits (..., vocab): (probabilities (..., k), token ids (..., k))."""
    probs, ids = logits.float().softmax(-1).topk(k, dim=-1)
    return probs, ids
