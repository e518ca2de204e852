"""The residual stream down to single neurons: TransformerLens' ``stack_neuron_results`` and
``get_full_resid_decomposition`` (same arguments, labels and order), and ``accumulated_bias``.

A neuron's result is its activation (``mlp.hook_post``, the input of ``fc_out``) times its column
of ``fc_out``'s weight; the output biases belong to no head or neuron and are summed in "bias".
"""

from __future__ import annotations

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.interp.resid import (
    ActivationCache,
    SliceInput,
    _final_layer,
    _model,
    apply_ln_to_stack,
    apply_slice,
    decompose_resid,
    dense_weight,
    finish_stack,
    output_bias,
    stack_head_results,
)


def neuron_results(cache: ActivationCache, layer: int, neuron_slice: SliceInput = None) -> torch.Tensor:
    """Return each MLP neuron's write to the stream in ``layer``: ([batch,] pos, neurons, d_model).

    ``hook_post`` of the neuron times its column of ``fc_out``; ``fc_out``'s bias is not included.
    """
    mlp = _model(cache).blocks[layer].mlp
    if not hasattr(mlp, "fc_out"):
        raise InputError(f"layer {layer} is a mixture of experts: its neurons belong to its experts, not to the "
                         f"layer; decompose it by blocks.{layer}.mlp.hook_expert_out instead")
    post = apply_slice(cache[f"blocks.{layer}.mlp.hook_post"], neuron_slice, -1)  # ([batch,] pos, neurons)
    w_out = apply_slice(dense_weight(_model(cache).blocks[layer].mlp.fc_out), neuron_slice, 1)  # (d_model, neurons)
    return post.unsqueeze(-1) * w_out.T.to(post.dtype)  # ([batch,] pos, neurons, d_model)


def stack_neuron_results(cache: ActivationCache, layer: int | None = -1, pos_slice: SliceInput = None,
                         neuron_slice: SliceInput = None, return_labels: bool = False, incl_remainder: bool = False,
                         apply_ln: bool = False, mlp_input: bool = False,
                         ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
    """Return every neuron's write before ``layer``: (layer * neurons [+ 1], batch, pos, d_model).

    Labels "L0N0", "L0N1", ...; ``neuron_slice`` keeps some neurons of each layer. ``incl_remainder``
    adds "remainder", the rest of the stream entering ``layer`` (its MLP with ``mlp_input``).
    ``apply_ln`` divides by the cached norm scale there. Costs batch * pos * neurons * d_model
    numbers per layer: keep inputs short or slice.
    """
    layer = _final_layer(cache, layer)
    d_ff = cache["blocks.0.mlp.hook_post"].shape[-1]
    kept = apply_slice(torch.arange(d_ff), neuron_slice, 0).reshape(-1).tolist()
    parts = [apply_slice(neuron_results(cache, i, kept), pos_slice, -3).movedim(-2, 0) for i in range(layer)]
    labels = [f"L{i}N{n}" for i in range(layer) for n in kept]
    out = finish_stack(cache, parts, labels, layer, incl_remainder, apply_ln, mlp_input, pos_slice)
    return (out, labels) if return_labels else out


def accumulated_bias(model: nn.Module, layer: int, mlp_input: bool = False,
                     include_mlp_biases: bool = True) -> torch.Tensor:
    """Return the sum of the output biases written before ``layer``'s input: (d_model,).

    Every earlier attention output bias, and MLP output bias with ``include_mlp_biases``; with
    ``mlp_input`` also ``layer``'s own attention output bias. Zeros for a model without biases.
    """
    first = model.blocks[0].attn.out
    total = torch.zeros(first.out_features, dtype=torch.float32, device=next(model.parameters()).device)
    for i in range(layer + (1 if mlp_input else 0)):
        block = model.blocks[i]
        parts = [block.attn.out] + ([block.mlp.fc_out] if include_mlp_biases and i < layer else [])
        for bias in map(output_bias, parts):
            if bias is not None:
                total = total + bias.float()
    return total.detach()


def get_full_resid_decomposition(cache: ActivationCache, layer: int | None = None, mlp_input: bool = False,
                                 expand_neurons: bool = True, apply_ln: bool = False, pos_slice: SliceInput = None,
                                 return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
    """Return every head, every neuron (or MLP), the embeddings and the biases: (components, batch, pos, d_model).

    The components sum to the stream entering ``layer`` (None: the unembed); order and labels as
    TransformerLens: "L{l}H{h}" for heads (up to ``layer``, including its own with ``mlp_input``),
    "L{l}N{n}" for neurons (or "{l}_mlp_out" without ``expand_neurons``, biases then included),
    "embed", "pos_embed" (when cached), "bias". ``apply_ln`` divides by the cached norm scale of
    ``layer``'s input.
    """
    model = _model(cache)
    layer = _final_layer(cache, layer)
    if mlp_input and layer == cache.n_layers[""]:
        raise InputError("mlp_input=True needs a layer below n_layers: the unembed has no MLP")
    heads, labels = stack_head_results(cache, layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True)
    parts = [heads]
    if layer > 0:
        if expand_neurons:
            neurons, names = stack_neuron_results(cache, layer, pos_slice=pos_slice, return_labels=True)
        else:
            neurons, names = decompose_resid(cache, layer, mode="mlp", pos_slice=pos_slice, incl_embeds=False,
                                             return_labels=True)
        parts.append(neurons)
        labels = labels + names
    for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
        if name in cache:
            parts.append(apply_slice(cache[name], pos_slice, -2)[None])
            labels.append(label)
    bias = accumulated_bias(model, layer, mlp_input, include_mlp_biases=expand_neurons)
    parts.append(bias.to(heads.dtype).expand(1, *heads.shape[1:]))
    labels.append("bias")
    out = torch.cat(parts)
    if apply_ln:
        out = apply_ln_to_stack(cache, out, layer, mlp_input, pos_slice)
    return (out, labels) if return_labels else out
