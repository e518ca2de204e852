"""formerkit.interp.patching: batched sweeps = one forward per index with a single hook; ablation = recomputation."""

from __future__ import annotations

import itertools

import pytest
import torch

import formerkit as fk
from conftest import require
from formerkit.interp import get_act_name, run_with_cache, run_with_hooks
from formerkit.interp import patching as P

VOCAB = 64
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=VOCAB, max_seq_len=16, init_std=0.3)


def build(preset: str, seed: int = 0) -> fk.Transformer:
    torch.manual_seed(seed)
    extra = {"n_kv_heads": 2} if preset == "llama" else {}
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **SMALL, **extra)).eval()


def ids(B: int = 2, T: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def metric(logits: torch.Tensor) -> torch.Tensor:
    """A logit difference at the last position, averaged over the batch: a scalar, as in TransformerLens."""
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


# name, where(index) -> selection after the batch dim, grid(cfg, T)
SWEEPS = {
    "get_act_patch_resid_pre": ("resid_pre", lambda ix: (ix[1],), lambda c, T: (c.n_layers, T)),
    "get_act_patch_resid_mid": ("resid_mid", lambda ix: (ix[1],), lambda c, T: (c.n_layers, T)),
    "get_act_patch_attn_out": ("attn_out", lambda ix: (ix[1],), lambda c, T: (c.n_layers, T)),
    "get_act_patch_mlp_out": ("mlp_out", lambda ix: (ix[1],), lambda c, T: (c.n_layers, T)),
    "get_act_patch_attn_head_out_all_pos": ("z", lambda ix: (slice(None), ix[1]), lambda c, T: (c.n_layers, c.n_heads)),
    "get_act_patch_attn_head_out_by_pos": ("z", lambda ix: (ix[1], ix[2]), lambda c, T: (c.n_layers, T, c.n_heads)),
    "get_act_patch_attn_head_pattern_all_pos": ("pattern", lambda ix: (ix[1],), lambda c, T: (c.n_layers, c.n_heads)),
}


def naive(model, corrupted, cache, name, where, grid) -> torch.Tensor:
    """The reference: one forward per index, one hook writing the clean activation at that index."""
    out = torch.zeros(grid)
    for ix in itertools.product(*map(range, grid)):
        full = get_act_name(name, ix[0])

        def patch(act, hook, ix=ix, full=full):
            act = act.clone()
            sel = (slice(None), *where(ix))
            act[sel] = cache[full][sel]
            return act

        with torch.no_grad():
            out[ix] = metric(run_with_hooks(model, corrupted, fwd_hooks=[(full, patch)]))
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model = build(request.param)
    _, cache = run_with_cache(model, ids(seed=1))
    return model, ids(seed=2), cache


@pytest.mark.parametrize("fn", list(SWEEPS))
@pytest.mark.parametrize("batch_size", [3, 64])
def test_sweep_equals_one_forward_per_index(setup, fn, batch_size):
    model, corrupted, cache = setup
    name, where, grid = SWEEPS[fn]
    grid = grid(model.config, corrupted.shape[1])
    got = getattr(P, fn)(model, corrupted, cache, metric, batch_size=batch_size)
    assert got.shape == grid
    torch.testing.assert_close(got, naive(model, corrupted, cache, name, where, grid), rtol=0, atol=1e-5)


def test_block_every_stacks_three_sweeps(setup):
    model, corrupted, cache = setup
    got = P.get_act_patch_block_every(model, corrupted, cache, metric, batch_size=8)
    assert got.shape == (3, 2, corrupted.shape[1])
    for i, fn in enumerate(["get_act_patch_resid_pre", "get_act_patch_attn_out", "get_act_patch_mlp_out"]):
        torch.testing.assert_close(got[i], getattr(P, fn)(model, corrupted, cache, metric), rtol=0, atol=1e-5)


def test_patching_the_clean_run_into_itself_changes_nothing(setup):
    """Corrupted tokens = the clean ones: every patch writes what is there: every cell = the clean metric."""
    model, corrupted, cache = setup
    clean_metric = metric(model(ids(seed=1)).logits)
    got = P.get_act_patch_resid_pre(model, ids(seed=1), cache, metric)
    torch.testing.assert_close(got, torch.full_like(got, clean_metric.item()), rtol=0, atol=1e-5)


# ---- ablation ----------------------------------------------------------------------------

def by_hand(model, tokens, name, fill) -> torch.Tensor:
    """Logits with ``fill(activation)`` applied at ``name`` through a plain PyTorch forward hook."""
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: fill(o.clone()))
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_zero_and_mean_head_ablation(preset):
    model, tokens = build(preset), ids(3, 6)
    _, cache = run_with_cache(model, tokens)

    def zero(z):
        z[:, :, 2] = 0
        return z

    def mean(z):
        z[:, :, 2] = cache["z", 1][:, :, 2].mean(dim=(0, 1))
        return z

    zeroed = by_hand(model, tokens, "blocks.1.attn.hook_z", zero)
    torch.testing.assert_close(P.ablate_heads(model, tokens, [(1, 2)]), zeroed)
    expected = by_hand(model, tokens, "blocks.1.attn.hook_z", mean)
    torch.testing.assert_close(P.ablate_heads(model, tokens, [(1, 2)], kind="mean"), expected)
    torch.testing.assert_close(P.ablate_heads(model, tokens, [(1, 2)], kind="mean", mean_cache=cache), expected)
    assert not torch.allclose(expected, model(tokens).logits)


def test_zeroing_a_head_equals_recomputing_attention_without_it():
    """Zeroing head h of hook_z removes its slice of the output projection: attn_out - z_h @ W_O[h]."""
    model, tokens = build("gpt2"), ids(2, 6)
    _, cache = run_with_cache(model, tokens)
    attn = model.blocks[0].attn
    D = attn.d_head
    head_term = cache["z", 0][:, :, 1] @ attn.out.weight[:, D:2 * D].T  # (B, T, d_model)
    patched_attn_out = cache["attn_out", 0] - head_term
    expected = run_with_hooks(model, tokens, fwd_hooks=[("blocks.0.hook_attn_out", lambda a, h: patched_attn_out)])
    torch.testing.assert_close(P.ablate_heads(model, tokens, [(0, 1)]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_neuron_ablation(preset):
    model, tokens = build(preset), ids(2, 6)
    _, cache = run_with_cache(model, tokens)
    neurons = [(0, 5), (0, 17), (1, 63)]

    def fill(layer, value):
        def run(post):
            for lay, i in neurons:
                if lay == layer:
                    post[:, :, i] = value(lay, i)
            return post
        return run

    def both(value):
        handles = [model.blocks[lay].mlp.hook_post.register_forward_hook(
            lambda m, i, o, lay=lay: fill(lay, value)(o.clone())) for lay in (0, 1)]
        try:
            with torch.no_grad():
                return model(tokens).logits
        finally:
            for h in handles:
                h.remove()

    torch.testing.assert_close(P.ablate_neurons(model, tokens, neurons), both(lambda lay, i: 0.0))
    mean = both(lambda lay, i: cache["post", lay][:, :, i].mean())
    torch.testing.assert_close(P.ablate_neurons(model, tokens, neurons, kind="mean"), mean)


# ---- errors ------------------------------------------------------------------------------

def test_mismatched_clean_cache_is_refused(setup):
    model, corrupted, cache = setup
    with pytest.raises(fk.InputError, match=r"\(2, 5, 32\).*\(2, 6\)"):
        P.get_act_patch_resid_pre(model, ids(2, 6), cache, metric)
    with pytest.raises(fk.InputError, match=r"\(2, 4, 5, 5\).*\(3, 5\)"):
        P.get_act_patch_attn_head_pattern_all_pos(model, ids(3, 5), cache, metric)
    with pytest.raises(fk.InputError, match="batch, pos"):
        P.get_act_patch_resid_pre(model, ids(2, 5)[0], cache, metric)


def test_bad_ablation_indices_are_refused():
    model, tokens = build("gpt2"), ids()
    with pytest.raises(fk.InputError, match="layer 2 is out of range"):
        P.ablate_heads(model, tokens, [(2, 0)])
    with pytest.raises(fk.InputError, match="head 4 of layer 0 is out of range"):
        P.ablate_heads(model, tokens, [(0, 4)])
    with pytest.raises(fk.InputError, match="neuron 64 of layer 1"):
        P.ablate_neurons(model, tokens, [(1, 64)])
    with pytest.raises(fk.InputError, match="kind"):
        P.ablate_heads(model, tokens, [(0, 0)], kind="resample")


# ---- TransformerLens' own sweeps, run on the formerkit model -------------------------------

class TLView:
    """What TransformerLens' patching functions use of a model: ``cfg``, ``run_with_hooks`` (no module: eval mode).

    TransformerLens 4 no longer builds a HookedTransformer from a config offline, so its sweep code
    (index grid, patch setters, output shapes) runs here on the formerkit model itself.
    """

    def __init__(self, model: fk.Transformer) -> None:
        c = model.config
        self.model = model
        self.cfg = type("Cfg", (), dict(n_layers=c.n_layers, n_heads=c.n_heads, n_key_value_heads=c.n_kv_heads,
                                         device="cpu"))()

    def run_with_hooks(self, tokens, fwd_hooks):
        with torch.no_grad():
            return run_with_hooks(self.model, tokens, fwd_hooks=fwd_hooks)


@pytest.mark.parametrize("fn", [*SWEEPS, "get_act_patch_block_every"])
def test_sweep_equals_transformerlens_patching(setup, fn):
    tl_patching = require("transformer_lens.patching")
    model, corrupted, cache = setup
    expected = getattr(tl_patching, fn)(TLView(model), corrupted, cache, metric)
    got = getattr(P, fn)(model, corrupted, cache, metric, batch_size=16)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
