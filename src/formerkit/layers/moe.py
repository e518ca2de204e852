"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Switch), and its router losses.

A linear router scores every expert per token; softmax over all experts, then each token goes
to its top ``k`` (weights renormalised to sum to 1, or kept as the softmax gave them). Experts are
gated (SwiGLU/GeGLU) or plain MLPs whose weights lie stacked, one (width, d_model) slice per
expert, so the computation runs grouped by expert: the token-to-expert assignments are sorted by
expert, each expert's tokens gathered into one row of an (experts, slots, d_model) buffer, and
three batched products compute every expert at once; no Python loop runs over tokens or experts.
A few tokens (decoding) instead gather the weights of their own experts.

While training with a ``capacity_factor``, an expert takes at most
``ceil(factor * tokens * k / n_experts)`` assignments, first choices before second choices, then
by token order (Switch Transformer, GShard); a dropped assignment adds nothing, so a token dropped
by all its experts leaves the layer as it came, through the residual. At inference nothing is
dropped, so a token's output never depends on the other tokens of its batch.

Each forward keeps its router logits on the module (``router_logits``); ``router_losses`` turns
those of a model's last forward into the load-balancing loss (the formula of transformers'
``load_balancing_loss_func``) and the router z-loss (ST-MoE) that training adds to its loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from formerkit.layers.feedforward import ACTIVATIONS, FeedForward
from formerkit.layers.hooks import HookPoint
from formerkit.layers.linear import Linear


class MoE(nn.Module):
    """A feed-forward of ``n_experts`` experts, ``top_k`` per token, with an optional gated shared expert.

    Parameters: ``router`` (Linear d_model -> n_experts, no bias); ``w_in`` (n_experts * width,
    d_model) with, when gated, each expert's gate rows before its up rows (n_experts * 2 * width
    rows); ``w_out`` (n_experts * d_model, width); ``shared`` (a ``FeedForward``) and
    ``shared_gate`` (Linear d_model -> 1) when ``shared_d_ff`` > 0.

    Hooks: ``hook_router_logits`` (B, T, n_experts) the router's scores; ``hook_router_weights``
    (B, T, n_experts) each expert's weight for each token (zero outside its top k: editing it
    reweights or ablates experts); ``hook_expert_out`` (B, T, d_model) the routed experts' weighted
    sum; the shared expert's own ``hook_pre``/``hook_post``.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, *, activation: str, gated: bool,
                 renormalize: bool = True, shared_d_ff: int = 0, capacity_factor: float | None = None,
                 init_std: float = 0.02, out_std: float = 0.02) -> None:
        super().__init__()
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.act, self.gated, self.renormalize = ACTIVATIONS[activation], gated, renormalize
        self.capacity_factor = capacity_factor
        self.router = Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts * d_ff * (2 if gated else 1), d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts * d_model, d_ff))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=out_std)
        self.shared = FeedForward(d_model, shared_d_ff, activation, gated, bias=False) if shared_d_ff else None
        self.shared_gate = Linear(d_model, 1, bias=False) if shared_d_ff else None
        self.hook_router_logits, self.hook_router_weights = HookPoint(), HookPoint()
        self.hook_expert_out = HookPoint()
        self.router_logits: torch.Tensor | None = None  # (B * T, n_experts) of the latest forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route x (B, T, d_model) to its experts; return their weighted sum (+ the shared expert), (B, T, d_model)."""
        B, T, D = x.shape
        logits = self.hook_router_logits(self.router(x))  # (B, T, E)
        self.router_logits = logits.reshape(B * T, self.n_experts)
        probs = logits.float().softmax(-1)  # (B, T, E)
        top, chosen = probs.topk(self.top_k, dim=-1)  # (B, T, k)
        if self.renormalize:
            top = top / top.sum(-1, keepdim=True)
        if self.hook_router_weights.active:  # the dense (B, T, E) view only when someone looks at it
            dense = self.hook_router_weights(torch.zeros_like(probs).scatter(-1, chosen, top))
            top = dense.gather(-1, chosen)
        flat, chosen, top = x.reshape(B * T, D), chosen.reshape(B * T, self.top_k), top.reshape(B * T, self.top_k)
        dropping = self.training and self.capacity_factor is not None
        if not dropping and B * T * self.top_k <= self.n_experts:
            out = self._gathered(flat, chosen, top)
        else:
            out = self._grouped(flat, chosen, top, self._capacity(B * T) if dropping else None)
        out = self.hook_expert_out(out.reshape(B, T, D))
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out

    def _capacity(self, n_tokens: int) -> int:
        """Most assignments one expert takes while dropping: ceil(factor * tokens * k / n_experts)."""
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def _expert(self, h: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """Experts on their rows: h (G, R, D), w_in (G, [2] F, D), w_out (G, D, F) -> (G, R, D)."""
        hidden = torch.bmm(h, w_in.transpose(1, 2))  # (G, R, [2] F)
        if self.gated:
            gate, up = hidden.split(self.d_ff, dim=-1)  # (G, R, F) each
            hidden = self.act(gate) * up
        else:
            hidden = self.act(hidden)
        return torch.bmm(hidden, w_out.transpose(1, 2))  # (G, R, D)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked expert weights viewed per expert: (E, [2] F, D) and (E, D, F)."""
        E = self.n_experts
        return self.w_in.view(E, -1, self.d_model), self.w_out.view(E, self.d_model, self.d_ff)

    def _gathered(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Few tokens: each (token, expert) pair with that expert's weights gathered. x (N, D) -> (N, D)."""
        N, k = chosen.shape
        w_in, w_out = self._weights()
        experts = chosen.reshape(-1)  # (N * k,)
        rows = x.repeat_interleave(k, dim=0)[:, None]  # (N * k, 1, D)
        y = self._expert(rows, w_in[experts], w_out[experts])[:, 0]  # (N * k, D)
        return (y * weights.reshape(-1, 1).to(y.dtype)).view(N, k, -1).sum(1)

    def _grouped(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                 capacity: int | None) -> torch.Tensor:
        """Every expert at once on its tokens, gathered into (E, slots, D); over ``capacity`` slots are dropped.

        x (N, D), chosen and weights (N, k); returns (N, D).
        """
        N, k = chosen.shape
        E, D = self.n_experts, self.d_model
        expert = chosen.t().reshape(-1)  # (k * N,) choice-major: every first choice before any second choice
        token = torch.arange(N, device=x.device).repeat(k)  # (k * N,)
        weight = weights.t().reshape(-1).to(x.dtype)  # (k * N,)
        order = torch.argsort(expert, stable=True)  # assignments grouped by expert, in priority order within
        counts = torch.bincount(expert, minlength=E)  # (E,)
        starts = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel(), device=x.device) - starts[expert[order]]  # rank within its expert
        if capacity is None:
            slots = int(counts.max())  # one device read: the fullest expert
            dest = expert * slots + slot  # (k * N,) row of the buffer
        else:
            slots = capacity
            dest = torch.where(slot < slots, expert * slots + slot, E * slots)  # dropped: the spare last row
        buffer = x.new_zeros(E * slots + 1, D)
        buffer[dest] = x[token]
        y = self._expert(buffer[:-1].view(E, slots, D), *self._weights())  # (E, slots, D)
        y = torch.cat([y.reshape(E * slots, D), y.new_zeros(1, D)])  # the spare row reads zero
        return torch.zeros_like(x).index_add_(0, token, y[dest] * weight[:, None])


def router_losses(model: nn.Module, attention_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The load-balancing loss and the router z-loss of ``model``'s latest forward; None without experts.

    Load balancing (Switch Transformer; transformers' ``load_balancing_loss_func``): over the
    tokens of every sparse layer together, ``n_experts * sum_e f_e * P_e``, f_e the share of the
    top-k assignments that went to expert e (summing to k), P_e the mean router probability of e;
    1 * k when balanced. Z-loss (ST-MoE): the mean over tokens and layers of logsumexp(logits)^2.
    ``attention_mask`` (B, T) leaves padding tokens out of both.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]
    if not layers:
        return None
    n_experts, top_k = layers[0].n_experts, layers[0].top_k
    logits = torch.cat([m.router_logits for m in layers]).float()  # (layers * N, E)
    keep = torch.ones(logits.shape[0], device=logits.device)
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).to(logits.device, torch.float32).repeat(len(layers))  # (layers * N,)
    probs = logits.softmax(-1)  # (layers * N, E)
    assigned = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)  # (layers * N, E)
    total = keep.sum()
    share = (assigned * keep[:, None]).sum(0) / total  # (E,)
    mean_prob = (probs * keep[:, None]).sum(0) / total  # (E,)
    balance = n_experts * (share * mean_prob).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2 * keep).sum() / total
    return balance, z
