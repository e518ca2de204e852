"""formerkit.interp residual-stream analysis against brute-force recomputation from formerkit's own model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import formerkit as fk
from formerkit.errors import InputError
from formerkit.interp import logit_lens, run_with_cache, run_with_hooks, top_tokens

VOCAB = 64
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=VOCAB, max_seq_len=16, init_std=0.3)
TOL = dict(atol=1e-4, rtol=1e-4)


def build(preset: str) -> fk.Transformer:
    torch.manual_seed(0)
    extra = {"n_kv_heads": 2} if preset == "llama" else {}
    model = fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **extra})).eval()
    with torch.no_grad():  # norms away from (1, 0), so a missing weight or bias shows
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln"):
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return model


def ids(B: int = 2, T: int = 7) -> torch.Tensor:
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["gpt2", "llama"])
def run(request):
    model = build(request.param)
    logits, cache = run_with_cache(model, ids())
    return model, logits, cache


def test_hook_scale_is_the_norm_divisor_and_changes_nothing(run):
    model, logits, cache = run
    x = cache["resid_post", -1]
    centered = x - x.mean(-1, keepdim=True) if model.config.norm == "layernorm" else x
    torch.testing.assert_close(cache["ln_final.hook_scale"], (centered.pow(2).mean(-1, keepdim=True)
                                                              + model.ln_final.eps).sqrt(), **TOL)
    torch.testing.assert_close(logits, model(ids()).logits, **TOL)  # the unfused path = the fused one
    assert cache["blocks.0.ln1.hook_scale"].shape == (2, 7, 1)


def test_accumulated_resid_labels_and_values(run):
    model, logits, cache = run
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    assert stack.shape == (5, 2, 7, 32)
    torch.testing.assert_close(stack[3], cache["resid_mid", 1])
    assert cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)[1] == ["0_pre", "1_pre", "1_mid"]
    final = cache.accumulated_resid(apply_ln=True)[-1]
    torch.testing.assert_close(model.lm_head(final), logits, **TOL)  # the final row is the model's logits


def test_decompose_resid_sums_to_the_stream(run):
    model, logits, cache = run
    parts, labels = cache.decompose_resid(return_labels=True)
    expected = ["embed", "pos_embed"] if model.pos_embed is not None else ["embed"]
    assert labels == expected + ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    torch.testing.assert_close(parts.sum(0), cache["resid_post", 1], **TOL)
    mid = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 1], **TOL)
    assert cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)[1] == ["0_attn_out",
                                                                                         "1_attn_out"]


def test_apply_ln_to_stack_sums_to_the_normalized_stream(run):
    model, logits, cache = run
    norm = model.ln_final
    for layer, mlp_input, target, ln in [(None, False, cache["resid_post", 1], norm),
                                         (1, False, cache["resid_pre", 1], model.blocks[1].ln1),
                                         (1, True, cache["resid_mid", 1], model.blocks[1].ln2)]:
        scaled = cache.decompose_resid(layer=layer, mlp_input=mlp_input, apply_ln=True).sum(0)
        bias = ln.bias if getattr(ln, "bias", None) is not None else 0
        torch.testing.assert_close(scaled * ln.weight + bias, ln(target), **TOL)


def test_logit_attrs_are_projections_on_the_unembedding(run):
    model, logits, cache = run
    parts = cache.decompose_resid()
    tokens = ids()
    attrs = cache.logit_attrs(parts, tokens)  # (components, B, T)
    normed = model.ln_final(cache["resid_post", 1])
    bias = model.ln_final.bias if getattr(model.ln_final, "bias", None) is not None else 0
    W = model.lm_head.proj.weight
    expected = ((normed - bias) / model.ln_final.weight * W[tokens]).sum(-1)
    torch.testing.assert_close(attrs.sum(0), expected, **TOL)
    diff = cache.logit_attrs(parts, tokens, incorrect_tokens=tokens.flip(-1))
    torch.testing.assert_close(diff, attrs - cache.logit_attrs(parts, tokens.flip(-1)), **TOL)
    last = cache.logit_attrs(parts[:, :, -1], tokens[:, 0], pos_slice=-1)  # one token per example
    torch.testing.assert_close(last, cache.logit_attrs(parts, tokens[:, :1].expand(2, 7))[:, :, -1], **TOL)


def test_logit_lens_final_row_is_the_logits_and_earlier_rows_the_head_on_each_stream(run):
    model, logits, cache = run
    lens, labels = logit_lens(model, cache)
    assert labels == ["0_pre", "1_pre", "final_post"] and lens.shape == (3, 2, 7, VOCAB)
    torch.testing.assert_close(lens[-1], logits, **TOL)
    torch.testing.assert_close(lens[1], model.lm_head(model.ln_final(cache["resid_pre", 1])), **TOL)
    probs, top = top_tokens(lens, k=3)
    assert top.shape == (3, 2, 7, 3)
    torch.testing.assert_close(probs[..., 0], F.softmax(lens, -1).amax(-1), **TOL)


def test_layers_removed_by_hooks_show_in_the_stack():
    model = build("gpt2")
    zeroed = run_with_hooks(model, ids(), fwd_hooks=[("blocks.1.hook_mlp_out", lambda a, h: torch.zeros_like(a))])
    _, cache = run_with_cache(model, ids())
    parts, labels = cache.decompose_resid(return_labels=True)
    keep = [i for i, label in enumerate(labels) if label != "1_mlp_out"]
    torch.testing.assert_close(model.lm_head(model.ln_final(parts[keep].sum(0))), zeroed, **TOL)


def test_refusals():
    model = build("gpt2")
    _, cache = run_with_cache(model, ids(), names_filter=lambda n: "resid" in n)
    with pytest.raises(InputError, match="blocks.1.ln1.hook_scale"):
        cache.accumulated_resid(layer=1, apply_ln=True)
    with pytest.raises(InputError, match="layer must be"):
        cache.accumulated_resid(layer=5)
    with pytest.raises(InputError, match="holds no model"):
        type(cache)(dict(cache)).accumulated_resid()
    with pytest.raises(InputError, match="same shape"):
        cache.logit_attrs(cache.accumulated_resid(), ids(), incorrect_tokens=3)


def test_a_cache_without_batch_dim():
    model = build("gpt2")
    _, cache = run_with_cache(model, ids(1, 7))
    single = cache.remove_batch_dim()
    assert single.model is model and not single.has_batch_dim
    torch.testing.assert_close(single.accumulated_resid(apply_ln=True), cache.accumulated_resid(apply_ln=True)[:, 0])
    parts = single.decompose_resid(layer=1, apply_ln=True)
    torch.testing.assert_close(parts, cache.decompose_resid(layer=1, apply_ln=True)[:, 0])
    torch.testing.assert_close(single.logit_attrs(single.decompose_resid(), ids(1, 7)[0], has_batch_dim=False),
                               cache.logit_attrs(cache.decompose_resid(), ids(1, 7))[:, 0], **TOL)


def test_head_results_sum_to_the_attention_output(run):
    model, _, cache = run
    heads, labels = cache.stack_head_results(layer=1, return_labels=True)
    assert labels == [f"L0H{h}" for h in range(4)] and heads.shape == (4, 2, 7, 32)
    bias = model.blocks[0].attn.out.bias if model.blocks[0].attn.out.bias is not None else 0
    torch.testing.assert_close(heads.sum(0) + bias, cache["attn_out", 0], **TOL)
    whole = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(whole.sum(0), cache["resid_post", 1], **TOL)
    assert cache.stack_head_results(layer=0).shape == (0, 2, 7, 32)


def test_full_decomposition_sums_to_the_stream_down_to_neurons(run):
    model, _, cache = run
    for layer, mlp_input, entering in ((None, False, ("resid_post", 1)), (1, True, ("resid_mid", 1)),
                                       (1, False, ("resid_pre", 1))):
        for expand in (True, False):
            parts = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=expand)
            torch.testing.assert_close(parts.sum(0), cache[entering], **TOL)
    neurons = cache.stack_neuron_results(layer=1)  # (d_ff, batch, pos, d_model): layer 0's neurons
    torch.testing.assert_close(neurons.sum(0) + (model.blocks[0].mlp.fc_out.bias if model.blocks[0].mlp.fc_out.bias
                                                 is not None else 0), cache["mlp_out", 0], **TOL)
    with pytest.raises(InputError, match="mlp_input=True needs a layer below"):
        cache.get_full_resid_decomposition(mlp_input=True)


def test_decompositions_of_an_int8_model_use_its_dequantized_weights():
    from formerkit.layers.quantized import quantize_int8

    model = quantize_int8(build("gpt2"))
    _, cache = run_with_cache(model, ids())
    torch.testing.assert_close(cache.get_full_resid_decomposition().sum(0), cache["resid_post", 1], **TOL)


def test_decompositions_see_lora_adapters():
    from formerkit.compress import add_lora

    model = add_lora(build("llama"), r=2, target_modules=["out", "fc_out"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    _, cache = run_with_cache(model, ids())
    torch.testing.assert_close(cache.get_full_resid_decomposition().sum(0), cache["resid_post", 1], **TOL)
    torch.testing.assert_close(cache.stack_head_results(layer=1).sum(0), cache["attn_out", 0], **TOL)
