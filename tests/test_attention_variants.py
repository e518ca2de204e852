"""Attention variants (ModelConfig.attn_type, attn_gate): each against a brute-force recomputation, with the
KV cache, hooks, checkpoints and a resumed training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import formerkit as fk
from formerkit.cache import KVCache
from formerkit.generate.jacobi import jacobi_generate
from formerkit.layers import attention_variants as variants
from formerkit.train import train
from test_train import config, losses

SMALL = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64, max_seq_len=160)
VARIANTS = {
    "clipped": dict(attn_type="clipped", clip_gamma=-0.05, clip_zeta=1.02),
    "gated": dict(attn_gate=True),
    "linear": dict(attn_type="linear"),
    "linear-identity": dict(attn_type="linear", linear_feature="identity"),
}


def _model(preset: str = "llama", **kw) -> fk.Transformer:
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **kw})).eval()


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def test_clipped_softmax_is_the_closed_form_and_can_reach_exact_zero():
    scores = torch.tensor([[4.0, 0.0, -6.0]])
    probs = variants.clipped_softmax(scores, -0.03, 1.0)
    expected = (1.03 * scores.softmax(-1) - 0.03).clamp(0, 1)
    torch.testing.assert_close(probs, expected)
    assert probs[0, 2] == 0.0 and scores.softmax(-1)[0, 2] > 0


def test_clipped_with_no_clipping_is_the_plain_model():
    plain, clipped = _model(), _model(attn_type="clipped", clip_gamma=0.0, clip_zeta=1.0)
    clipped.load_state_dict(plain.state_dict())
    ids = _ids(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(clipped(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_clipped_pattern_hook_sees_the_clipped_probabilities():
    model = _model(**VARIANTS["clipped"])
    _, cache = fk.run_with_cache(model, _ids(1, 12), names_filter=["blocks.0.attn.hook_attn_scores",
                                                                 "blocks.0.attn.hook_pattern"])
    scores, pattern = cache["blocks.0.attn.hook_attn_scores"], cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern, variants.clipped_softmax(scores, -0.05, 1.02))


def test_gate_scales_each_head_by_a_sigmoid_of_its_input():
    model = _model(**VARIANTS["gated"])
    ids = _ids(1, 10)
    names = ["blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_gate", "blocks.0.attn.hook_z"]
    _, cache = fk.run_with_cache(model, ids, names_filter=names)
    attn = model.blocks[0].attn
    gate_in = cache["blocks.0.ln1.hook_normalized"]  # (1, T, d_model)
    torch.testing.assert_close(cache["blocks.0.attn.hook_gate"], attn.gate(gate_in))
    with torch.no_grad():  # the ungated heads: the same layer with its gate removed
        gate, attn.gate = attn.gate, None
        _, plain = fk.run_with_cache(model, ids, names_filter=["blocks.0.attn.hook_z"])
        attn.gate = gate
    expected = plain["blocks.0.attn.hook_z"] * torch.sigmoid(attn.gate(gate_in)).unsqueeze(-1)
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature", ["elu", "identity"])
def test_linear_attention_in_linear_time_equals_the_written_out_weights(causal, feature):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 150, 8, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = variants.feature_map(q, feature), variants.feature_map(k, feature)
    normalize = feature == "elu"
    brute = variants.linear_pattern(q, k, None, causal, normalize) @ v
    fast, _ = variants.linear_attention(q, k, v, causal=causal, normalize=normalize)
    torch.testing.assert_close(fast, brute)
    if causal:  # in two calls, the second starting from the first's state: the same
        first, state = variants.linear_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], causal=True,
                                                 normalize=normalize)
        second, _ = variants.linear_attention(q[:, :, 70:], k[:, :, 70:], v[:, :, 70:], causal=True,
                                              normalize=normalize, state=state)
        torch.testing.assert_close(torch.cat([first, second], dim=2), brute)


def test_unnormalised_identity_linear_attention_is_the_masked_product():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    weights = (q @ k.transpose(-1, -2)).tril()
    fast, _ = variants.linear_attention(q, k, v, causal=True, normalize=False)
    torch.testing.assert_close(fast, weights @ v)


@pytest.mark.parametrize("name", ["linear", "linear-identity"])
def test_linear_cache_is_a_fixed_size_state(name):
    model = _model(**VARIANTS[name])
    small, large = KVCache.for_model(model, 2, 16), KVCache.for_model(model, 2, 4096)
    sizes = [{n: b.shape for n, b in c.layers.named_buffers()} for c in (small, large)]
    assert sizes[0] == sizes[1] and sizes[0]["0.kv_sum"] == (2, 4, 8, 8)
    ids = _ids(2, 30)
    with torch.no_grad():
        full = model(ids).logits
        small = KVCache.for_model(model, 2, 40)
        steps = [model(ids[:, :7], cache=small).logits] + [model(ids[:, t:t + 1], cache=small).logits
                                                            for t in range(7, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(fk.InputError, match="cannot drop"):
        small.truncate(10)
    small.reset()
    assert small.layers[0].kv_sum.abs().max() == 0


def test_linear_padded_batch_rows_equal_them_alone():
    model = _model(**VARIANTS["linear"])
    ids = _ids(2, 40)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[:1, 6:]).logits
    torch.testing.assert_close(batch[0, 6:], alone[0], atol=1e-5, rtol=1e-5)


def test_linear_generation_equals_greedy_recomputation():
    model = _model(**VARIANTS["linear"])
    prompt = _ids(1, 9)
    out = fk.generate(model, prompt, fk.GenerationConfig(max_new_tokens=12))
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_linear_self_attention_in_an_encoder_decoder_caches():
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("t5-small", n_layers=2, d_model=32, n_heads=4, d_ff=48,
                                                      vocab_size=64, max_seq_len=64, position="none",
                                                      attn_type="linear")).eval()
    src, tgt = _ids(2, 11), _ids(2, 9, seed=2)
    with torch.no_grad():
        full = model(src, decoder_input_ids=tgt).logits
        cache = KVCache.for_model(model, 2, 16)
        steps = [model(src, decoder_input_ids=tgt[:, :4], cache=cache).logits]
        steps += [model(src, decoder_input_ids=tgt[:, t:t + 1], cache=cache).logits for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_lowrank_encoder_equals_projected_attention_and_ignores_right_padding():
    model = _model("bert-base", attn_type="lowrank", lowrank_k=16, n_kv_heads=None, position="none")
    ids = _ids(2, 50)
    attn = model.blocks[0].attn
    with torch.no_grad():
        _, cache = fk.run_with_cache(model, ids[:1], names_filter=lambda n: n.startswith("blocks.0.attn.hook_"))
        q, k, v = (cache[f"blocks.0.attn.hook_{n}"].transpose(1, 2) for n in "qkv")  # (1, H, S, D)
        kp, vp = attn.proj_k[:, :50] @ k, attn.proj_v[:, :50] @ v  # (1, H, 16, D)
        z = F.scaled_dot_product_attention(q, kp, vp)
        torch.testing.assert_close(cache["blocks.0.attn.hook_z"], z.transpose(1, 2), atol=1e-5, rtol=1e-5)
        mask = torch.ones(2, 50, dtype=torch.long)
        mask[0, 42:] = 0
        padded = model(ids, attention_mask=mask).logits[0, :42]
        torch.testing.assert_close(padded, model(ids[:1, :42]).logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(fk.InputError, match="at most 160 keys"):
        model(_ids(1, 161))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_round_trip_natively_and_refuse_the_hf_layout(name, tmp_path):
    model = _model(**VARIANTS[name])
    fk.save_pretrained(model, tmp_path / "native")
    again = fk.from_pretrained(tmp_path / "native")
    ids = _ids(1, 12)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(fk.ConfigError, match="no Hugging Face layout"):
        fk.save_pretrained(model, tmp_path / "hf", format="hf")


@pytest.mark.parametrize("kw, message", [
    (dict(attn_type="clipped", clip_gamma=0.1), "clip_gamma <= 0"),
    (dict(attn_type="linear", position="alibi"), "no score matrix"),
    (dict(attn_type="linear", sliding_window=4), "running state"),
    (dict(attn_type="lowrank"), "encoders only"),
    (dict(attn_type="flash"), "attn_type"),
    (dict(clip_zeta=float("nan")), "clip_zeta"),
])
def test_bad_variant_configs_say_what_to_change(kw, message):
    with pytest.raises(fk.ConfigError, match=message):
        fk.ModelConfig.from_preset("llama", **{**SMALL, **kw})


def test_rewinding_decoders_and_eviction_refuse_linear_attention():
    model = _model(**VARIANTS["linear"])
    with pytest.raises(fk.InputError, match="fixed-size running state"):
        fk.generate(model, _ids(1, 5), max_new_tokens=4, cache_policy="sinks:8")
    with pytest.raises(fk.InputError, match="needs softmax attention"):
        jacobi_generate(model, _ids(1, 5), max_new_tokens=8, block_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["--model.attn_type linear", "--model.attn_type clipped --model.attn_gate true"])
def test_a_resumed_variant_run_is_bit_identical(tmp_path, variant):
    # the kernels fixed: timings of a model this small are noise, and a resume may measure a different winner
    args = ("--checkpoint.every", "5", "--log.samples", "0", "--eval.every", "5", "--optim.kernel", "foreach",
            "--train.attention", "eager", *variant.split())
    train(config(tmp_path, *args, steps=10))
    straight = losses(tmp_path / "run")
    train(config(tmp_path, *args, "--checkpoint.resume", "step-0000005", steps=10))
    resumed = losses(tmp_path / "run")
    assert all(resumed[s] == straight[s] for s in range(6, 11))


def test_latency_benchmark_measures_every_attention_at_every_length(tmp_path):
    from conftest import load_script

    bench = load_script("benchmarks/attention_latency.py")
    out = bench.main(["--lengths", "16,32", "--threads", "1", "--layers", "1", "--d-model", "16", "--heads", "2",
                      "--rank", "8", "--repeats", "1", "--png", str(tmp_path / "latency.png")])
    expected = {(m, a, 1, n) for m, kinds in [("encoder forward", ("full", "linear", "lowrank")),
                                              ("decode step", ("full", "linear"))] for a in kinds for n in (16, 32)}
    assert set(out) == expected and all(s > 0 for s in out.values())
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_pruned_heads_of_gated_linear_attention_keep_cache_and_gate_in_step():
    from formerkit.compress.prune import prune_heads

    model = prune_heads(_model(attn_type="linear", attn_gate=True, n_kv_heads=None), {0: [1], 1: [0, 3]})
    assert model.config.n_heads == [3, 2] and model.blocks[1].attn.gate.out_features == 2
    ids = _ids(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model, 2, 24)
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                           for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
