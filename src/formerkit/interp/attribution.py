"""Attribution of one logit to the input tokens.

Gradient x input, integrated gradients, attention rollout and flow, gradient-weighted attention
relevance (Chefer et al. 2021). The gradient methods replace a (batch, pos, d_model) activation (the token embeddings at
``hook_embed`` by default) through a forward hook, so gradients reach it; the attention methods
read per-layer patterns (``hook_pattern``, (batch, heads, T, T)) as ``run_with_cache`` stores them.
Rollout and flow follow Abnar & Zuidema 2020; flow solves one max-flow per input token (Edmonds-Karp).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.interp.run import Hook, hook_points, hooks, run_with_hooks


def _hook_name(model: nn.Module, layer: str) -> str:
    """The full hook name of ``layer``: "embed" is ``hook_embed``; anything else is a full name."""
    name = "hook_embed" if layer == "embed" else layer
    if name not in hook_points(model):
        raise InputError(f'layer must be "embed" or a hook name of this model, got {layer!r}')
    return name


def _targets(target: int | Sequence[int] | torch.Tensor, batch: int, vocab: int) -> torch.Tensor:
    """``target`` as a (batch,) long tensor of ids in [0, vocab)."""
    t = torch.as_tensor(target).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise InputError(f"target must be one id or one per batch row ({batch}), got {t.numel()}")
    if bool((t < 0).any() | (t >= vocab).any()):
        raise InputError(f"target ids must be in [0, {vocab}) (the logits' last dim), got {t.tolist()}")
    return t


def _pick(logits: torch.Tensor, target: torch.Tensor, position: int) -> torch.Tensor:
    """The target logit of each row: (rows,) from logits (rows, pos, vocab) at ``position``, or (rows, labels)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if logits.dim() == 2:  # a classifier: no position
        return logits[rows, target]
    return logits[rows, position, target]


def _prepare(model: nn.Module, input_ids: torch.Tensor, target, position: int,
             layer: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Check the arguments; return (hook name, the activation (batch, pos, d_model), target ids (batch,))."""
    name = _hook_name(model, layer)
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, pos), got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if not -T <= position < T:
        raise InputError(f"position must be in [{-T}, {T}) for {T} tokens, got {position}")
    seen: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook: Hook) -> None:
        seen["act"] = act.detach()

    with torch.no_grad(), hooks(model, [(name, save)]):
        logits = getattr(model(input_ids), "logits", None)
    if logits is None:
        raise InputError("attribution needs logits (an LM or classifier head); this model has no head")
    return name, seen["act"], _targets(target, input_ids.shape[0], logits.shape[-1]).to(input_ids.device)


def _logits_at(model: nn.Module, input_ids: torch.Tensor, name: str, act: torch.Tensor) -> torch.Tensor:
    """The logits of a forward with the activation at ``name`` replaced by ``act`` (rows, pos, d_model)."""
    return run_with_hooks(model, input_ids, fwd_hooks=[(name, lambda _a, _h: act)])


def gradient_x_input(model: nn.Module, input_ids: torch.Tensor, target: int | Sequence[int] | torch.Tensor, *,
                     position: int = -1, layer: str = "embed", reduce: bool = True) -> torch.Tensor:
    """Gradient x input of each row's ``target`` logit at ``position`` with respect to ``layer``'s activation.

    Returns (batch, pos), summed over d_model, or (batch, pos, d_model) with ``reduce=False``.
    ``target``: one token id, or one per batch row; ``layer``: "embed" (``hook_embed``) or a hook name.
    """
    name, act, target = _prepare(model, input_ids, target, position, layer)
    x = act.clone().requires_grad_(True)  # (batch, pos, d_model)
    with torch.enable_grad():
        out = _pick(_logits_at(model, input_ids, name, x), target, position)
        (grad,) = torch.autograd.grad(out.sum(), x)
    attr = (grad * act).detach()
    return attr.sum(-1) if reduce else attr


def integrated_gradients(model: nn.Module, input_ids: torch.Tensor, target: int | Sequence[int] | torch.Tensor, *,
                         baseline: torch.Tensor | None = None, steps: int = 50, position: int = -1,
                         layer: str = "embed", batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of each row's ``target`` logit from ``baseline`` to ``layer``'s activation.

    The path integral is a midpoint Riemann sum over ``steps`` points, ``batch_size`` rows per
    forward. ``baseline``: (batch, pos, d_model) or broadcastable to it; None is zeros.
    Returns (attributions (batch, pos), summed over d_model; completeness gap (batch,)), the gap
    being f(input) - f(baseline) - attributions.sum(-1), which shrinks as ``steps`` grows.
    """
    if steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    name, act, target = _prepare(model, input_ids, target, position, layer)
    B = act.shape[0]
    base = torch.zeros_like(act) if baseline is None else baseline.to(act)
    try:
        base = base.expand_as(act)
    except RuntimeError:
        raise InputError(f"baseline of shape {tuple(base.shape)} does not broadcast to the activation "
                         f"{tuple(act.shape)}") from None
    alphas = (torch.arange(steps, dtype=act.dtype, device=act.device) + 0.5) / steps  # midpoints
    grads = torch.zeros_like(act)  # (batch, pos, d_model): the sum of the gradients along the path
    per = max(1, batch_size // B)  # path points per forward
    with torch.enable_grad():
        for start in range(0, steps, per):
            a = alphas[start:start + per, None, None, None]  # (k, 1, 1, 1)
            x = (base + a * (act - base)).reshape(-1, *act.shape[1:]).requires_grad_(True)  # (k * batch, pos, d)
            ids = input_ids.repeat(a.shape[0], 1)
            out = _pick(_logits_at(model, ids, name, x), target.repeat(a.shape[0]), position)
            (g,) = torch.autograd.grad(out.sum(), x)
            grads += g.view(-1, *act.shape).sum(0)
    attr = (grads / steps * (act - base)).sum(-1)  # (batch, pos)
    with torch.no_grad():
        ends = _pick(_logits_at(model, input_ids.repeat(2, 1), name, torch.cat([act, base])),
                     target.repeat(2), position)
    return attr, ends[:B] - ends[B:] - attr.sum(-1)


def attention_relevance(model: nn.Module, input_ids: torch.Tensor, target: int | Sequence[int] | torch.Tensor, *,
                        position: int = -1) -> torch.Tensor:
    """Gradient-weighted attention relevance (Chefer et al. 2021) of each row's ``target`` logit at ``position``.

    With A each layer's pattern (``hook_pattern``) and dA the target logit's gradient there:
    R = I; for each layer, first to last, R += mean_heads(clamp(dA * A, min=0)) @ R.
    Single-stack models. Returns R's row at ``position``: (batch, T_in).
    """
    _, _, target = _prepare(model, input_ids, target, position, "embed")
    names = [n for n in hook_points(model) if n.startswith("blocks.") and n.endswith(".attn.hook_pattern")]
    if not names:
        raise InputError("attention_relevance covers single-stack models with self-attention blocks")
    patterns: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def save(t: torch.Tensor, hook: Hook) -> None:
        patterns[hook.name] = t.detach()

    def save_grad(g: torch.Tensor, hook: Hook) -> None:
        grads[hook.name] = g.detach()

    leaf = [("hook_embed", lambda a, _h: a.detach().requires_grad_(True))]  # gradients reach the patterns
    with torch.enable_grad():
        logits = run_with_hooks(model, input_ids, fwd_hooks=leaf + [(n, save) for n in names],
                                bwd_hooks=[(n, save_grad) for n in names])
        _pick(logits, target, position).sum().backward()
    B, T = input_ids.shape
    r = torch.eye(T, device=input_ids.device).expand(B, T, T)  # (batch, T_out, T_in)
    for n in names:
        a = (grads[n] * patterns[n]).clamp(min=0).float().mean(1)  # (batch, T, T)
        r = r + a @ r
    return r[:, position]


def _mixed(patterns: torch.Tensor | Sequence[torch.Tensor], add_residual: bool) -> torch.Tensor:
    """Head-averaged patterns (layers, batch, T, T), with the residual mixed in (0.5 A + 0.5 I, rows renormalised)."""
    if not isinstance(patterns, torch.Tensor):
        if len(patterns) == 0:
            raise InputError("patterns is empty; give one (batch, heads, T, T) pattern per layer")
        patterns = torch.stack(list(patterns))
    if patterns.dim() != 5 or patterns.shape[-1] != patterns.shape[-2]:
        raise InputError("patterns must be (layers, batch, heads, T, T) or a list of (batch, heads, T, T), "
                         f"got shape {tuple(patterns.shape)}")
    a = patterns.float().mean(2)  # (layers, batch, T, T)
    if add_residual:
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
    return a


def attention_rollout(patterns: torch.Tensor | Sequence[torch.Tensor], *, add_residual: bool = True) -> torch.Tensor:
    """Attention rollout: the product of the head-averaged per-layer patterns, last layer first.

    ``patterns``: (layers, batch, heads, T, T) or a list of (batch, heads, T, T), first layer first.
    Returns (batch, T_out, T_in): how much each output position of the last layer draws on each input token.
    """
    a = _mixed(patterns, add_residual)
    out = a[0]
    for layer in a[1:]:
        out = layer @ out  # (batch, T, T)
    return out


def attention_flow(patterns: torch.Tensor | Sequence[torch.Tensor], *, position: int = -1,
                   add_residual: bool = True) -> torch.Tensor:
    """Attention flow: the max-flow from each input token to ``position`` of the last layer.

    The graph has a node per token per layer (layer 0 = the inputs); position i of layer l is
    reached from position j of layer l-1 with capacity the head-averaged attention of i on j (with
    the residual mixed in). ``patterns`` as for ``attention_rollout``. Returns (batch, T_in).
    """
    a = _mixed(patterns, add_residual)
    L, B, T, _ = a.shape
    if not -T <= position < T:
        raise InputError(f"position must be in [{-T}, {T}) for {T} tokens, got {position}")
    sink = L * T + position % T
    out = torch.zeros(B, T)
    for b in range(B):
        caps = _capacities(a[:, b].tolist(), T)
        for j in range(T):
            out[b, j] = _max_flow(caps, j, sink)
    return out.to(a.device)


def _capacities(layers: list[list[list[float]]], T: int) -> dict[int, dict[int, float]]:
    """The layered graph: node k * T + i; an edge (k-1, j) -> (k, i) of capacity layers[k-1][i][j] where positive."""
    caps: dict[int, dict[int, float]] = {}
    for k, rows in enumerate(layers, start=1):
        for i, row in enumerate(rows):
            for j, w in enumerate(row):
                if w > 0:
                    caps.setdefault((k - 1) * T + j, {})[k * T + i] = w
    return caps


def _max_flow(caps: dict[int, dict[int, float]], source: int, sink: int) -> float:
    """Edmonds-Karp: the value of a maximum flow from ``source`` to ``sink`` through ``caps`` (left unchanged)."""
    residual: dict[int, dict[int, float]] = {}
    for u, edges in caps.items():
        for v, w in edges.items():
            residual.setdefault(u, {})[v] = residual.get(u, {}).get(v, 0.0) + w
            residual.setdefault(v, {}).setdefault(u, 0.0)
    total = 0.0
    while True:
        parent = {source: source}
        queue = deque([source])
        while queue and sink not in parent:  # breadth-first: a shortest augmenting path
            u = queue.popleft()
            for v, w in residual.get(u, {}).items():
                if w > 1e-12 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            return total
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= push
            residual[v][u] += push
        total += push
