"""formerkit.interp: run_with_cache / run_with_hooks against hand-registered hooks and recomputation from weights."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from conftest import recording
from formerkit.interp import ActivationCache, get_act_name, hook_points, hooks, run_with_cache, run_with_hooks

VOCAB = 64
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=VOCAB, max_seq_len=16, init_std=0.3)


def build(preset: str, seed: int = 0, **overrides) -> fk.Transformer:
    torch.manual_seed(seed)
    extra = {"n_decoder_layers": 2} if preset in ("t5-small", "bart-base") else {}
    extra |= {"n_kv_heads": 2} if preset == "llama" else {}
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **extra, **overrides})).eval()


def ids(B: int = 2, T: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())


def call_kwargs(preset: str) -> dict:
    if preset in ("t5-small", "bart-base"):
        return {"input_ids": ids(2, 7), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
                "decoder_input_ids": ids(2, 5, seed=3)}
    return {"input_ids": ids()}


# ---- the cache holds what plain hooks see ------------------------------------------------

@pytest.mark.parametrize("preset", ["gpt2", "llama", "bert-base", "t5-small"])
def test_cache_equals_hand_registered_hooks(preset):
    model = build(preset)
    names = [n for n in hook_points(model) if not n.endswith("hook_result")]  # per-head results: on request
    kwargs = call_kwargs(preset)
    with recording(model, names) as seen:
        ref = model(**kwargs)
    out, cache = run_with_cache(model, **kwargs)
    assert no_hooks_left(model)
    torch.testing.assert_close(out, ref.logits if ref.logits is not None else ref.hidden_states, rtol=0, atol=0)
    assert sorted(cache.keys()) == sorted(seen)  # the points that fired (no rot_q without RoPE, ...)
    assert set(names) - set(seen) <= {n for n in names if n.endswith(("hook_rot_q", "hook_rot_k", "hook_pre_linear",
                                                                      "hook_pos_embed", "hook_cross_attn_out",
                                                                      "hook_resid_mid_cross"))}
    for name in seen:
        torch.testing.assert_close(cache[name], seen[name], rtol=0, atol=0, msg=name)
        assert not cache[name].requires_grad
    pattern = "decoder.blocks.1.attn.hook_pattern" if "t5" in preset else "blocks.1.attn.hook_pattern"
    torch.testing.assert_close(cache[pattern].sum(-1), torch.ones(cache[pattern].shape[:-1]))


def test_headless_model_returns_hidden_states():
    model = build("gpt2", head="none")
    out, cache = run_with_cache(model, ids())
    torch.testing.assert_close(out, model(ids()).hidden_states)
    torch.testing.assert_close(out, cache["ln_final.hook_normalized"])


# ---- short keys --------------------------------------------------------------------------

SHORT = [(("pattern", 0), "blocks.0.attn.hook_pattern"), (("resid_post", 1), "blocks.1.hook_resid_post"),
         (("z", 1, "attn"), "blocks.1.attn.hook_z"), (("normalized", 0, "ln1"), "blocks.0.ln1.hook_normalized"),
         (("embed",), "hook_embed"), (("resid_pre", -1), "blocks.1.hook_resid_pre"),
         (("resid_mid", -2), "blocks.0.hook_resid_mid"), (("q", 0), "blocks.0.attn.hook_q"),
         (("pre", 1), "blocks.1.mlp.hook_pre"), (("post", 0), "blocks.0.mlp.hook_post"),
         (("attn_out", 0), "blocks.0.hook_attn_out"), (("mlp_out", 1), "blocks.1.hook_mlp_out"),
         (("normalized", None, "ln_final"), "ln_final.hook_normalized")]


def test_get_act_name_follows_transformerlens():
    assert get_act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert get_act_name("rot_k", 2) == "blocks.2.attn.hook_rot_k"
    assert get_act_name("pre_linear", 1) == "blocks.1.mlp.hook_pre_linear"
    assert get_act_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert get_act_name("embed") == "hook_embed" and get_act_name("pos_embed") == "hook_pos_embed"
    assert get_act_name("blocks.0.hook_resid_pre") == "blocks.0.hook_resid_pre"
    assert get_act_name("resid_post", 1, "encoder") == "encoder.blocks.1.hook_resid_post"
    assert get_act_name("pattern", 0, "decoder.cross_attn") == "decoder.blocks.0.cross_attn.hook_pattern"
    assert get_act_name("v", 0, "decoder") == "decoder.blocks.0.attn.hook_v"
    with pytest.raises(ValueError, match="layer >= 0"):
        get_act_name("pattern", -1)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_short_keys_are_the_full_names(preset):
    _, cache = run_with_cache(build(preset), ids())
    for key, full in SHORT:
        assert cache[key if len(key) > 1 else key[0]] is cache[full], key
        assert (key if len(key) > 1 else key[0]) in cache
    if preset == "llama":
        assert cache["rot_q", 1] is cache["blocks.1.attn.hook_rot_q"]
        assert cache["pre_linear", 0] is cache["blocks.0.mlp.hook_pre_linear"]
    else:
        assert ("rot_q", 0) not in cache
        with pytest.raises(fk.InputError, match="rot_q"):
            cache["rot_q", 0]


def test_encoder_decoder_short_keys_name_the_stack():
    model = build("t5-small")
    _, cache = run_with_cache(model, **call_kwargs("t5-small"))
    assert cache["resid_post", 1, "encoder"] is cache["encoder.blocks.1.hook_resid_post"]
    assert cache["resid_post", -1, "decoder"] is cache["decoder.blocks.1.hook_resid_post"]
    assert cache["pattern", 0, "decoder.cross_attn"] is cache["decoder.blocks.0.cross_attn.hook_pattern"]
    assert cache["embed", None, "decoder"] is cache["decoder.hook_embed"]
    with pytest.raises(fk.InputError, match=r"ambiguous.*encoder\.blocks\.0\.hook_resid_post or decoder"):
        cache["resid_post", 0]
    with pytest.raises(fk.InputError, match="ambiguous"):
        cache["embed"]


# ---- attention scores and per-head results ----------------------------------------------

@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_attention_scores_are_the_scaled_products_before_softmax(preset):
    model = build(preset)
    _, cache = run_with_cache(model, ids())
    for i, block in enumerate(model.blocks):
        scores, pattern = cache["attn_scores", i], cache["pattern", i]  # (B, H, T, T)
        torch.testing.assert_close(scores.softmax(-1), pattern)
        q, k = (cache["rot_" + n if preset == "llama" else n, i] for n in "qk")  # (B, T, H|KV, D)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # GQA: each query head's key head
        brute = torch.einsum("bqhd,bkhd->bhqk", q, k) * block.attn.scale
        causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
        torch.testing.assert_close(scores[..., causal], brute[..., causal], rtol=1e-5, atol=1e-5)
        assert (scores[..., ~causal] < -1e30).all()  # masked: float32's minimum, as in TransformerLens


@pytest.mark.parametrize("preset", ["llama", "t5-small"])
def test_editing_attention_scores_steers_the_pattern(preset):
    model = build(preset)
    kwargs = call_kwargs(preset)
    name = "decoder.blocks.0.attn.hook_attn_scores" if "t5" in preset else "blocks.0.attn.hook_attn_scores"

    def hide_first_key(scores, hook):
        scores = scores.clone()
        scores[..., 1:, 0] = torch.finfo(scores.dtype).min  # no query but the first may read position 0
        return scores

    plain = run_with_hooks(model, **kwargs)
    with hooks(model, [(name, hide_first_key)]):
        steered, cache = run_with_cache(model, **kwargs, names_filter=name.replace("attn_scores", "pattern"))
    pattern = cache[name.replace("attn_scores", "pattern")]
    assert pattern[..., 1:, 0].abs().max() == 0 and torch.allclose(pattern.sum(-1), torch.ones(()))
    assert not torch.allclose(steered, plain) and no_hooks_left(model)


@pytest.mark.parametrize("preset", ["gpt2", "llama", "bart-base"])
def test_per_head_results_sum_to_the_attention_output(preset):
    model = build(preset)
    kwargs = call_kwargs(preset)
    stack = "decoder." if preset == "bart-base" else ""
    out, cache = run_with_cache(model, **kwargs,
                                names_filter=lambda n: n.endswith(("hook_result", "attn.hook_z", "hook_attn_out")))
    torch.testing.assert_close(out, run_with_hooks(model, **kwargs), rtol=1e-5, atol=1e-5)
    blocks = model.decoder.blocks if stack else model.blocks
    for i, block in enumerate(blocks):
        result, z = cache[f"{stack}blocks.{i}.attn.hook_result"], cache[f"{stack}blocks.{i}.attn.hook_z"]
        H, D = z.shape[2], z.shape[3]
        w_o = block.attn.out.weight.view(-1, H, D)  # (d_model, H, D)
        torch.testing.assert_close(result, torch.einsum("bthd,mhd->bthm", z, w_o), rtol=1e-5, atol=1e-5)
        bias = block.attn.out.bias if block.attn.out.bias is not None else 0
        torch.testing.assert_close(result.sum(2) + bias, cache[f"{stack}blocks.{i}.hook_attn_out"],
                                   rtol=1e-5, atol=1e-5)


def test_per_head_results_of_an_int8_model_sum_to_its_output():
    from formerkit.layers.quantized import quantize_int8

    model = quantize_int8(build("gpt2"))
    _, cache = run_with_cache(model, ids(), names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out")))
    bias = model.blocks[1].attn.out.bias
    torch.testing.assert_close(cache["result", 1].sum(2) + bias, cache["attn_out", 1], rtol=1e-4, atol=1e-4)


# ---- names_filter ------------------------------------------------------------------------

@pytest.mark.parametrize("names_filter, expected", [
    ("blocks.0.hook_resid_post", ["blocks.0.hook_resid_post"]),
    (["blocks.1.attn.hook_pattern", "hook_embed"], ["hook_embed", "blocks.1.attn.hook_pattern"]),
    (lambda name: name.endswith("hook_resid_pre"), ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]),
])
def test_names_filter_stores_exactly_what_is_asked(names_filter, expected):
    model = build("gpt2")
    registered = []
    original = torch.nn.Module.register_forward_hook

    def spy(module, hook, *args, **kwargs):
        registered.append(module)
        return original(module, hook, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "register_forward_hook", spy)
        out, cache = run_with_cache(model, ids(), names_filter=names_filter)
    assert list(cache.keys()) == expected and len(cache) == len(expected)
    points = hook_points(model)
    name_of = {id(m): n for n, m in points.items()}
    assert sorted(name_of[id(m)] for m in registered) == sorted(expected)  # nothing else was hooked
    _, full = run_with_cache(model, ids())
    torch.testing.assert_close(out, model(ids()).logits)
    for name in expected:
        torch.testing.assert_close(cache[name], full[name])


def test_unknown_names_are_refused_before_running():
    model = build("gpt2")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(fk.InputError, match=r'no hook point "blocks.0.hook_resid_pots".*"blocks.0.hook_resid_post"'):
        run_with_cache(model, ids(), names_filter=["hook_embed", "blocks.0.hook_resid_pots"])
    with pytest.raises(fk.InputError, match='"blocks.1.attn.hook_pattern"'):
        run_with_hooks(model, ids(), fwd_hooks=[("blocks.1.attn.hook_patern", lambda t, h: None)])
    assert not calls
    _, cache = run_with_cache(model, ids(), names_filter="blocks.0.attn.hook_pattern")
    with pytest.raises(fk.InputError, match=r'no activation "blocks.0.attn.hook_patern".*"blocks.0.attn.hook_pattern"'):
        cache["blocks.0.attn.hook_patern"]
    with pytest.raises(fk.InputError, match=r"\('pattern', 1\).*blocks.1.attn.hook_pattern.*closest"):
        cache["pattern", 1]


# ---- storage options ---------------------------------------------------------------------

def test_remove_batch_dim_and_to():
    model = build("gpt2")
    _, one = run_with_cache(model, ids(1, 5), remove_batch_dim=True)
    _, ref = run_with_cache(model, ids(1, 5))
    assert one["pattern", 0].shape == (4, 5, 5) and one["resid_post", 1].shape == (5, 32)
    torch.testing.assert_close(one["z", 1], ref["z", 1][0])
    with pytest.raises(fk.InputError, match="batch of 1"):
        run_with_cache(model, ids(2, 5), remove_batch_dim=True)
    half = ref.to(torch.bfloat16)
    assert isinstance(half, ActivationCache) and half is not ref and len(half) == len(ref)
    assert all(t.dtype == torch.bfloat16 for t in half.values()) and ref["embed"].dtype == torch.float32
    torch.testing.assert_close(half["resid_pre", -1].float(), ref["resid_pre", -1], rtol=1e-2, atol=5e-2)
    assert half["resid_pre", -1] is half["blocks.1.hook_resid_pre"]  # still knows its depth
    assert ref.to("cpu")["embed"].device.type == "cpu"
    _, stored = run_with_cache(model, ids(1, 5), dtype=torch.float16, device="cpu")
    assert all(t.dtype == torch.float16 for t in stored.values())
    torch.testing.assert_close(stored["mlp_out", 0].float(), ref["mlp_out", 0], rtol=1e-2, atol=1e-2)


# ---- padding -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset, side", [("gpt2", "right"), ("llama", "left")])
def test_padded_batch_caches_what_each_row_gives_alone(preset, side):
    model = build(preset)
    rows = [ids(1, 7, seed=4)[0], ids(1, 4, seed=5)[0]]
    T = 7
    batch = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    spans = []
    for b, row in enumerate(rows):
        start = T - len(row) if side == "left" else 0
        batch[b, start:start + len(row)], mask[b, start:start + len(row)] = row, 1
        spans.append(slice(start, start + len(row)))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _, cache = run_with_cache(model, batch, attention_mask=mask, position_ids=positions)
    for b, row in enumerate(rows):
        _, alone = run_with_cache(model, row[None])
        real = spans[b]
        for name, t in alone.items():
            got = cache[name][b:b + 1]
            got = got[:, :, real, real] if name.endswith(("hook_pattern", "hook_attn_scores")) else got[:, real]
            torch.testing.assert_close(got, t, rtol=1e-4, atol=1e-4, msg=f"row {b}: {name}")
        pattern = cache["pattern", 1][b]  # (H, T, S)
        torch.testing.assert_close(pattern[:, real].sum(-1), torch.ones(4, len(row)))


# ---- run_with_hooks ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_zeroing_attn_out_changes_logits_as_recomputed(preset):
    """Zero the last block's attention output: logits = head(norm(x + mlp(ln2(x)))) for x = resid_pre."""
    model = build(preset)
    x = ids()
    _, clean = run_with_cache(model, x)
    seen = []
    logits = run_with_hooks(model, x, fwd_hooks=[
        ("blocks.1.hook_attn_out", lambda t, hook: (seen.append(hook.name), torch.zeros_like(t))[1])])
    assert seen == ["blocks.1.hook_attn_out"] and no_hooks_left(model)
    block = model.blocks[1]
    with torch.no_grad():
        resid = clean["resid_pre", 1]
        expected = model.lm_head(model.ln_final(resid + block.mlp(block.ln2(resid))))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - model(x).logits).abs().max() > 1e-2  # the edit matters
    # a hook returning None keeps the activation; predicates select several points
    same = run_with_hooks(model, x, fwd_hooks=[(lambda n: "resid" in n, lambda t, hook: None)])
    torch.testing.assert_close(same, model(x).logits, rtol=0, atol=0)


def test_backward_hooks_see_the_gradient():
    model = build("gpt2")
    x = ids()
    got = {}
    with hooks(model, bwd_hooks=[("blocks.0.hook_resid_mid", lambda g, hook: got.__setitem__(hook.name, g.clone()))]):
        model(x).logits.square().sum().backward()
    assert no_hooks_left(model)
    module = model.get_submodule("blocks.0.hook_resid_mid")
    ref = {}
    handle = module.register_forward_hook(lambda m, i, o: (o.retain_grad(), ref.__setitem__("t", o))[0])
    model(x).logits.square().sum().backward()
    handle.remove()
    torch.testing.assert_close(got["blocks.0.hook_resid_mid"], ref["t"].grad)
    # a backward hook can replace the gradient: zeroed at resid_pre, none reaches the position table
    for bwd, zero in (([], False), ([("blocks.0.hook_resid_pre", lambda g, hook: torch.zeros_like(g))], True)):
        model.zero_grad()
        run_with_hooks(model, x, bwd_hooks=bwd).square().sum().backward()
        assert bool((model.pos_embed.weight.grad == 0).all()) == zero


def test_hooks_are_removed_when_the_forward_raises():
    model = build("gpt2")

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(model, ids(), fwd_hooks=[("blocks.1.hook_mlp_out", boom)],
                       bwd_hooks=[("hook_embed", lambda g, hook: None)])
    assert no_hooks_left(model)
    with pytest.raises(fk.InputError):
        run_with_cache(model, torch.full((1, 3), VOCAB))  # out of the vocabulary: the model refuses it
    assert no_hooks_left(model)
    with pytest.raises(KeyError), hooks(model, fwd_hooks=[(lambda n: True, lambda t, hook: None)]):
        assert all(p.active for p in hook_points(model).values())
        raise KeyError("inside the block")
    assert no_hooks_left(model) and not any(p.active for p in hook_points(model).values())
