"""Hook points: the names from DESIGN.md, what they see, and rewriting activations through them."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from conftest import recording
from formerkit.layers.feedforward import ACTIVATIONS
from formerkit.layers.hooks import HookPoint

VOCAB = 40
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
BLOCK_HOOKS = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
               "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
CROSS_HOOKS = ["cross_attn.hook_q", "cross_attn.hook_k", "cross_attn.hook_v", "cross_attn.hook_pattern",
               "cross_attn.hook_z", "hook_cross_attn_out"]


def build(seed: int = 0, **overrides) -> fk.Transformer:
    torch.manual_seed(seed)
    return fk.Transformer(fk.ModelConfig(**{**BASE, **overrides})).eval()


def ids(B: int = 2, T: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def stack_hook_names(n_layers: int, prefix: str = "", cross: bool = False) -> list[str]:
    names = [f"{prefix}hook_embed", f"{prefix}hook_pos_embed", f"{prefix}ln_final.hook_normalized"]
    for i in range(n_layers):
        names += [f"{prefix}blocks.{i}.{h}" for h in BLOCK_HOOKS + (CROSS_HOOKS if cross else [])]
    return names


def assert_all_fire(model: fk.Transformer, names: list[str], **kwargs) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    for name in names:
        assert isinstance(modules.get(name), HookPoint), f"missing hook point {name}"
    with recording(model, names) as seen:
        model(**kwargs)
    assert sorted(seen) == sorted(names), f"never called: {set(names) - set(seen)}"
    return seen


def test_decoder_hook_names_exist_and_fire():
    model = build()
    assert_all_fire(model, stack_hook_names(2), input_ids=ids())


def test_encoder_decoder_hook_names_exist_and_fire():
    model = build(kind="encoder-decoder", n_decoder_layers=1, position="sinusoidal")
    names = stack_hook_names(2, "encoder.") + stack_hook_names(1, "decoder.", cross=True)
    assert not any(n.startswith("encoder.") and ".cross_attn." in n for n in dict(model.named_modules()))
    src, tgt = ids(2, 7), ids(2, 5, seed=2)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    seen = assert_all_fire(model, names, input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
    pattern = seen["decoder.blocks.0.cross_attn.hook_pattern"]  # (B, H, T_tgt, S_src)
    assert pattern.shape == (2, 4, 5, 7)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 5))
    assert (pattern[1, ..., 4:] == 0).all() and (pattern[1, ..., :4] > 0).all()  # padding gets nothing
    assert (pattern[0] > 0).all()  # cross-attention is not causal
    memory = model(src, mask, decoder_input_ids=tgt).encoder_hidden_states
    torch.testing.assert_close(seen["encoder.ln_final.hook_normalized"], memory)


def test_hooks_see_a_consistent_computation():
    """Recompute each hooked activation from the one before it, by hand."""
    model = build(n_kv_heads=2, activation="gelu")
    x = ids()
    B, T, H, KV, D = 2, 7, 4, 2, 8
    with recording(model, stack_hook_names(2)) as seen:
        out = model(x)
    torch.testing.assert_close(seen["hook_embed"], model.tok_embed(x))
    torch.testing.assert_close(seen["hook_pos_embed"], model.pos_embed(torch.arange(T)).expand(B, T, -1))
    torch.testing.assert_close(seen["blocks.0.hook_resid_pre"], seen["hook_embed"] + seen["hook_pos_embed"])
    for i, block in enumerate(model.blocks):
        get = lambda name, i=i: seen[f"blocks.{i}.{name}"]
        q, k, v = block.attn.qkv(block.ln1(get("hook_resid_pre"))).split([H * D, KV * D, KV * D], dim=-1)
        torch.testing.assert_close(get("attn.hook_q"), q.view(B, T, H, D))
        torch.testing.assert_close(get("attn.hook_k"), k.view(B, T, KV, D))
        torch.testing.assert_close(get("attn.hook_v"), v.view(B, T, KV, D))
        pattern = get("attn.hook_pattern")
        for h in range(H):  # query head h reads kv head h // 2
            scores = get("attn.hook_q")[:, :, h] @ get("attn.hook_k")[:, :, h // 2].transpose(1, 2) / D**0.5
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            torch.testing.assert_close(pattern[:, h], scores.softmax(-1), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(get("attn.hook_z")[:, :, h], pattern[:, h] @ get("attn.hook_v")[:, :, h // 2],
                                       atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(get("hook_attn_out"), block.attn.out(get("attn.hook_z").reshape(B, T, H * D)))
        torch.testing.assert_close(get("hook_resid_mid"), get("hook_resid_pre") + get("hook_attn_out"))
        torch.testing.assert_close(get("mlp.hook_pre"), block.mlp.fc_in(block.ln2(get("hook_resid_mid"))))
        torch.testing.assert_close(get("mlp.hook_post"), ACTIVATIONS["gelu"](get("mlp.hook_pre")))
        torch.testing.assert_close(get("hook_mlp_out"), block.mlp.fc_out(get("mlp.hook_post")))
        torch.testing.assert_close(get("hook_resid_post"), get("hook_resid_mid") + get("hook_mlp_out"))
        if i + 1 < len(model.blocks):
            torch.testing.assert_close(seen[f"blocks.{i + 1}.hook_resid_pre"], get("hook_resid_post"))
    torch.testing.assert_close(model.ln_final(seen["blocks.1.hook_resid_post"]), out.hidden_states)
    torch.testing.assert_close(seen["ln_final.hook_normalized"], out.hidden_states)


@pytest.mark.parametrize("overrides", [{}, {"position": "rope", "n_kv_heads": 1}, {"position": "alibi"},
                                       {"sliding_window": 3}])
def test_pattern_is_causal_distribution_and_output_unchanged(overrides):
    model = build(**overrides)
    x = ids(2, 9)
    plain = model(x).logits  # sdpa
    with recording(model, ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]) as seen:
        hooked = model(x).logits  # hooked layers switch to eager to materialize the pattern
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    for pattern in seen.values():
        assert pattern.shape == (2, 4, 9, 9)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 9))
        assert (pattern >= 0).all()
        assert (pattern.triu(1) == 0).all()  # nothing above the diagonal
        assert (pattern.diagonal(dim1=-2, dim2=-1) > 0).all()
        if "sliding_window" in overrides:
            assert (pattern.tril(-3) == 0).all()


def test_zeroing_attn_out_equals_zeroed_weights():
    model = build()
    x = ids()
    ref = model(x).logits
    handle = model.blocks[0].hook_attn_out.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    zeroed = model(x).logits
    handle.remove()
    assert (zeroed - ref).abs().max() > 1e-3
    manual = build()
    with torch.no_grad():
        manual.blocks[0].attn.out.weight.zero_()
        manual.blocks[0].attn.out.bias.zero_()
    torch.testing.assert_close(zeroed, manual(x).logits, atol=1e-6, rtol=1e-6)


def test_resid_post_through_ln_final_is_hidden_states():
    for overrides in [{}, {"norm": "rmsnorm"}, {"kind": "encoder", "head": "mlm"}]:
        model = build(**overrides)
        with recording(model, ["blocks.1.hook_resid_post"]) as seen:
            out = model(ids())
        torch.testing.assert_close(model.ln_final(seen["blocks.1.hook_resid_post"]), out.hidden_states)


def test_modifying_hook_z_changes_output_like_zeroed_head():
    """Zeroing head 2's z equals zeroing the out-projection columns that read head 2."""
    model = build(out_bias=True)
    x = ids()
    ref = model(x).logits

    def kill_head(module, inputs, z):  # z: (B, T, H, D)
        z = z.clone()
        z[:, :, 2] = 0
        return z

    handle = model.blocks[1].attn.hook_z.register_forward_hook(kill_head)
    patched = model(x).logits
    handle.remove()
    assert (patched - ref).abs().max() > 1e-3
    manual = build()
    with torch.no_grad():
        manual.blocks[1].attn.out.weight[:, 16:24] = 0
    torch.testing.assert_close(patched, manual(x).logits, atol=1e-6, rtol=1e-6)


def test_removed_hooks_leave_no_trace():
    model = build(position="rope")
    x = ids()
    before = model(x).logits
    names = stack_hook_names(2)
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o: o * 1.5) for n in names]
    handles.append(modules["blocks.0.attn.hook_q"].register_forward_pre_hook(lambda m, i: (i[0] * 0.5,)))
    during = model(x).logits
    assert (during - before).abs().max() > 1e-3
    for handle in handles:
        handle.remove()
    assert not any(m.active for m in model.modules() if isinstance(m, HookPoint))
    assert torch.equal(model(x).logits, before)


def test_hookpoint_is_identity_and_can_replace():
    hp = HookPoint()
    t = torch.randn(3)
    assert hp(t) is t and not hp.active
    handle = hp.register_forward_hook(lambda m, i, o: o + 1)
    assert hp.active
    torch.testing.assert_close(hp(t), t + 1)
    handle.remove()
    assert hp(t) is t
