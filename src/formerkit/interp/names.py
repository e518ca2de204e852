"""Hook names: TransformerLens' short keys (``("pattern", 0)``) turned into formerkit's full names."""

from __future__ import annotations

ATTN_NAMES = frozenset({"q", "k", "v", "z", "pattern", "attn_scores", "result", "rot_q", "rot_k"})
MLP_NAMES = frozenset({"pre", "post", "pre_linear"})
STACKS = ("encoder", "decoder")
# TransformerLens' aliases of activation names and of layer types
NAME_ALIASES = {"attn": "pattern", "key": "k", "query": "q", "value": "v", "mlp_pre": "pre", "mlp_post": "post"}
TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


def split_stack(layer_type: str | None) -> tuple[str, str | None]:
    """Split ``"decoder.cross_attn"`` into ``("decoder.", "cross_attn")``; ``"encoder"`` into ``("encoder.", None)``.

    Returns the stack prefix ("" when ``layer_type`` names no stack) and what is left of it.
    """
    if layer_type is None:
        return "", None
    head, _, rest = layer_type.partition(".")
    if head in STACKS:
        return f"{head}.", rest or None
    return "", layer_type


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Return the full hook name that TransformerLens' ``utils.get_act_name`` would give.

    ``get_act_name("pattern", 0)`` -> ``"blocks.0.attn.hook_pattern"``; ``("resid_post", 3)`` ->
    ``"blocks.3.hook_resid_post"``; ``("normalized", 0, "ln1")`` -> ``"blocks.0.ln1.hook_normalized"``;
    ``("embed")`` -> ``"hook_embed"``. A name that already holds a dot or starts with ``hook_`` is
    returned as it is when no layer or type is given. For encoder-decoder models ``layer_type``
    may name the stack, alone or in front: ``("resid_post", 1, "encoder")`` ->
    ``"encoder.blocks.1.hook_resid_post"``, ``("pattern", 0, "decoder.cross_attn")`` ->
    ``"decoder.blocks.0.cross_attn.hook_pattern"``. ``layer`` must be non-negative here
    (``ActivationCache`` resolves negative layers against the model's depth).
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    if layer is not None and layer < 0:
        raise ValueError(f"get_act_name needs a layer >= 0, got {layer}; ActivationCache resolves negative layers")
    prefix, layer_type = split_stack(layer_type)
    name = NAME_ALIASES.get(name, name)
    if layer_type in TYPE_ALIASES:
        layer_type = TYPE_ALIASES[layer_type]
    elif layer_type is None and name in ATTN_NAMES:
        layer_type = "attn"
    elif layer_type is None and name in MLP_NAMES:
        layer_type = "mlp"
    out = prefix + (f"blocks.{layer}." if layer is not None else "")
    return out + (f"{layer_type}." if layer_type else "") + f"hook_{name}"
