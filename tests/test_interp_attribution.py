"""formerkit.interp.attribution: closed forms on linear models and hand-built patterns, brute-force recomputation."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from conftest import require
from formerkit.errors import InputError
from formerkit.interp import (
    attention_flow,
    attention_relevance,
    attention_rollout,
    gradient_x_input,
    integrated_gradients,
    run_with_cache,
)

VOCAB = 64
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=VOCAB, max_seq_len=16, init_std=0.3)


def build(preset: str = "gpt2", seed: int = 0, **overrides) -> fk.Transformer:
    torch.manual_seed(seed)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **overrides})).eval()


def ids(B: int = 2, T: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def linear_model() -> fk.Transformer:
    """A GPT-2 whose blocks write nothing and which has no final norm: logits = W_U (embed + pos_embed)."""
    model = build(n_layers=1, final_norm=False)
    with torch.no_grad():
        for p in (*model.blocks[0].attn.out.parameters(), *model.blocks[0].mlp.fc_out.parameters()):
            p.zero_()
    return model


def embed_grad(model, tokens, target, position, alpha=1.0):
    """Brute force: a plain forward hook puts alpha * embeddings as a leaf in; returns (embeddings, gradient)."""
    emb = model.tok_embed(tokens).detach()
    x = (alpha * emb).requires_grad_(True)
    handle = model.hook_embed.register_forward_hook(lambda m, i, o: x)
    try:
        logits = model(tokens).logits
    finally:
        handle.remove()
    logits[torch.arange(len(tokens)), position, target].sum().backward()
    return emb, x.grad


# ---- gradient x input ---------------------------------------------------------------------

def test_gradient_x_input_is_the_exact_contribution_on_a_linear_model():
    model, tokens, target = linear_model(), ids(), torch.tensor([5, 9])
    attr = gradient_x_input(model, tokens, target)  # (batch, pos)
    emb = model.tok_embed(tokens)
    w_u = model.lm_head.proj.weight  # (vocab, d_model)
    exact = torch.zeros_like(attr)
    exact[:, -1] = (emb[:, -1] * w_u[target]).sum(-1)  # only the last token's embedding reaches its logit
    torch.testing.assert_close(attr, exact.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_gradient_x_input_equals_autograd_on_a_hand_hooked_forward(preset):
    model, tokens = build(preset), ids()
    full = gradient_x_input(model, tokens, 7, position=3, reduce=False)  # (batch, pos, d_model)
    emb, grad = embed_grad(model, tokens, torch.tensor([7, 7]), 3)
    torch.testing.assert_close(full, emb * grad)
    torch.testing.assert_close(gradient_x_input(model, tokens, 7, position=3), (emb * grad).sum(-1))
    assert full[:, 4:].abs().max() == 0  # causal: later tokens do not reach position 3


def test_gradient_x_input_of_a_classifier_label():
    model, tokens = build("bert-base", head="classifier", num_labels=3), ids()
    attr = gradient_x_input(model, tokens, [2, 0])
    x = model.tok_embed(tokens).detach().requires_grad_(True)
    handle = model.hook_embed.register_forward_hook(lambda m, i, o: x)
    try:
        model(tokens).logits[torch.arange(2), torch.tensor([2, 0])].sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(attr, (x.grad * x).sum(-1).detach())
    with pytest.raises(InputError, match=r"in \[0, 3\)"):
        gradient_x_input(model, tokens, 3)


def test_gradient_x_input_at_a_block_input():
    model, tokens = build(), ids()
    attr = gradient_x_input(model, tokens, 3, layer="blocks.1.hook_resid_pre")
    _, cache = run_with_cache(model, tokens, names_filter="blocks.1.hook_resid_pre")
    x = cache["blocks.1.hook_resid_pre"].clone().requires_grad_(True)
    handle = model.blocks[1].hook_resid_pre.register_forward_hook(lambda m, i, o: x)
    try:
        model(tokens).logits[:, -1, 3].sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(attr, (x.grad * x).sum(-1).detach())


# ---- integrated gradients -----------------------------------------------------------------

def test_integrated_gradients_is_exact_on_a_linear_model():
    model, tokens = linear_model(), ids()
    attr, gap = integrated_gradients(model, tokens, [5, 9], steps=3)
    torch.testing.assert_close(attr, gradient_x_input(model, tokens, [5, 9]), atol=1e-5, rtol=1e-5)
    assert gap.abs().max() < 1e-4


@pytest.mark.parametrize("preset, baseline_token", [("gpt2", None), ("llama", 0)])
def test_integrated_gradients_completeness_on_a_real_model(preset, baseline_token):
    # Llama has no position embeddings: zero embeddings put its RMSNorms at x = 0, where the path's
    # gradient spikes (1 / sqrt(eps)); its baseline is token 0's embedding at every position instead
    model, tokens = build(preset), ids()
    baseline = None if baseline_token is None else model.tok_embed(torch.full_like(tokens, baseline_token)).detach()
    attr, gap = integrated_gradients(model, tokens, [5, 9], baseline=baseline, steps=128, batch_size=128)
    emb = model.tok_embed(tokens).detach()
    with torch.no_grad():  # f(input) - f(baseline), recomputed with a plain hook putting the baseline in
        clean = model(tokens).logits[:, -1]
        handle = model.hook_embed.register_forward_hook(
            lambda m, i, o: torch.zeros_like(emb) if baseline is None else baseline)
        base = model(tokens).logits[:, -1]
        handle.remove()
    total = (clean - base)[torch.arange(2), torch.tensor([5, 9])]
    torch.testing.assert_close(attr.sum(-1) + gap, total)
    assert (gap.abs() / total.abs()).max() < 0.01


def test_integrated_gradients_one_step_is_the_midpoint_gradient_and_batching_changes_nothing():
    model, tokens = build(), ids()
    attr, _ = integrated_gradients(model, tokens, 4, steps=1)
    emb, grad = embed_grad(model, tokens, torch.tensor([4, 4]), -1, alpha=0.5)
    torch.testing.assert_close(attr, (grad * emb).sum(-1))
    a1, g1 = integrated_gradients(model, tokens, 4, steps=7, batch_size=1)
    a2, g2 = integrated_gradients(model, tokens, 4, steps=7, batch_size=64)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(g1, g2)


def test_integrated_gradients_with_the_input_as_baseline_is_zero():
    model, tokens = build(), ids()
    attr, gap = integrated_gradients(model, tokens, 4, baseline=model.tok_embed(tokens).detach(), steps=2)
    assert attr.abs().max() == 0 and gap.abs().max() == 0


# ---- attention rollout and flow --------------------------------------------------------------

def uniform_causal(T: int) -> torch.Tensor:
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(5).expand(3, 2, 4, 5, 5)  # (layers, batch, heads, T, T)
    torch.testing.assert_close(attention_rollout(eye), torch.eye(5).expand(2, 5, 5))
    torch.testing.assert_close(attention_rollout(list(eye), add_residual=False), torch.eye(5).expand(2, 5, 5))


def test_rollout_of_uniform_causal_attention_closed_forms():
    T = 5
    a = uniform_causal(T)
    one = attention_rollout(a.expand(1, 1, 2, T, T))
    torch.testing.assert_close(one[0], 0.5 * a + 0.5 * torch.eye(T))
    two = attention_rollout(a.expand(2, 1, 2, T, T), add_residual=False)[0]
    harmonic = torch.cumsum(1 / torch.arange(1, T + 1), 0)  # H_1 .. H_T
    h = torch.cat([torch.zeros(1), harmonic])  # H_0 .. H_T
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    exact = torch.where(j <= i, (h[i + 1] - h[j]) / (i + 1), 0.0)  # sum_{k=j..i} 1/(i+1) * 1/(k+1)
    torch.testing.assert_close(two, exact)


def test_rollout_equals_the_explicit_product_on_a_real_model():
    model, tokens = build(), ids()
    _, cache = run_with_cache(model, tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    patterns = [cache["pattern", i] for i in range(2)]
    eye = torch.eye(tokens.shape[1])
    mixed = [0.5 * p.mean(1) + 0.5 * eye for p in patterns]
    torch.testing.assert_close(attention_rollout(patterns), mixed[1] @ mixed[0])
    assert torch.allclose(attention_rollout(patterns).sum(-1), torch.ones(2, tokens.shape[1]))


def test_flow_of_a_two_layer_three_token_graph_by_hand():
    a1 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    a2 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.1, 0.6, 0.3]])
    # input j reaches output 2 only through the middle nodes i: flow = sum_i min(a1[i, j], a2[2, i])
    flow = attention_flow(torch.stack([a1, a2])[:, None, None], add_residual=False)
    torch.testing.assert_close(flow, torch.tensor([[0.1 + 0.5 + 0.2, 0.5 + 0.3, 0.3]]))
    to_first = attention_flow(torch.stack([a1, a2])[:, None, None], position=0, add_residual=False)
    torch.testing.assert_close(to_first, torch.tensor([[1.0, 0, 0]]))


def test_flow_equals_networkx_max_flow_on_a_real_model():
    nx = require("networkx")
    model, tokens = build(), ids(B=1)
    _, cache = run_with_cache(model, tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    patterns = torch.stack([cache["pattern", i] for i in range(2)])
    flow = attention_flow(patterns, position=4)
    T = tokens.shape[1]
    mixed = 0.5 * patterns.mean(2) + 0.5 * torch.eye(T)
    mixed = mixed / mixed.sum(-1, keepdim=True)
    graph = nx.DiGraph()
    for layer in range(2):
        for i in range(T):
            for j in range(T):
                graph.add_edge((layer, j), (layer + 1, i), capacity=float(mixed[layer, 0, i, j]))
    expected = [nx.maximum_flow_value(graph, (0, j), (2, 4)) for j in range(T)]
    torch.testing.assert_close(flow[0], torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert flow[0, 5:].abs().max() == 0  # causal: a later token reaches no earlier position


# ---- gradient-weighted attention relevance ---------------------------------------------------

def test_relevance_is_the_identity_row_when_attention_does_not_reach_the_logit():
    model, tokens = linear_model(), ids()  # the attention output is zeroed: the logit's gradient on A is 0
    rel = attention_relevance(model, tokens, [5, 9], position=2)
    torch.testing.assert_close(rel, torch.eye(tokens.shape[1])[2].expand(2, -1))


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_relevance_equals_the_recurrence_on_autograd_gradients(preset):
    model, tokens = build(preset), ids()
    eager = build(preset, attn_backend="eager")  # the same weights; plain hooks do not switch to the eager path
    patterns = []
    for b in eager.blocks:
        b.attn.hook_pattern.register_forward_hook(lambda m, i, o: patterns.append(o) or None)
    logits = eager(tokens).logits
    grads = torch.autograd.grad(logits[:, -1, 7].sum(), patterns)
    T = tokens.shape[1]
    r = torch.eye(T).expand(2, T, T)
    for a, g in zip(patterns, grads, strict=True):
        r = r + (g * a).clamp(min=0).mean(1) @ r
    rel = attention_relevance(model, tokens, 7)
    torch.testing.assert_close(rel, r[:, -1].detach())
    assert rel[:, -1].min() >= 1 and rel.min() >= 0


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda m, t: gradient_x_input(m, t, VOCAB), "target ids must be in"),
    (lambda m, t: gradient_x_input(m, t, [1, 2, 3]), "one per batch row"),
    (lambda m, t: gradient_x_input(m, t, 1, position=6), "position must be in"),
    (lambda m, t: gradient_x_input(m, t, 1, layer="blocks.9.hook_resid_pre"), "layer must be"),
    (lambda m, t: integrated_gradients(m, t, 1, steps=0), "steps must be at least 1"),
    (lambda m, t: integrated_gradients(m, t, 1, baseline=torch.zeros(3, 32)), "does not broadcast"),
    (lambda m, t: attention_rollout(torch.ones(2, 1, 4, 3)), "patterns must be"),
    (lambda m, t: attention_rollout([]), "patterns is empty"),
    (lambda m, t: attention_flow(torch.ones(2, 1, 1, 3, 3), position=3), "position must be in"),
    (lambda m, t: attention_relevance(m, t, VOCAB + 1), "target ids must be in"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(InputError, match=message):
        call(build(), ids())


def test_a_model_without_a_head_is_refused():
    with pytest.raises(InputError, match="no head"):
        gradient_x_input(build(head="none"), ids(), 1)
