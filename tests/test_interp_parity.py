"""formerkit.interp against TransformerLens itself: the same checkpoint, the same ids, every shared activation.

transformer-lens 4.3 has no ``HookedTransformer``: its ``TransformerBridge`` wraps a transformers
model, given here as a local object (no network). The bridge keeps the raw weights (no folded
norms, no centred weights), which is what formerkit runs.
"""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from conftest import require
from formerkit.interp import logit_lens, run_with_cache

transformers = require("transformers")
require("transformer_lens")

VOCAB, TOL = 64, 1e-4


def hf_model(kind: str, path) -> torch.nn.Module:
    """A small random checkpoint, every parameter drawn with std 0.3, saved under ``path``."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                       max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.5 if p.dim() == 1 and kind == "llama" else 0.0, 0.3)
    model.eval().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return model


def word_tokenizer():
    """A word-level tokenizer of VOCAB tokens, saved with the checkpoint so the bridge need not fetch one."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                                unk_token="t0", bos_token="t0", eos_token="t0", pad_token="t0")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def both(request, tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge

    path = tmp_path_factory.mktemp(request.param)
    reference = hf_model(request.param, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        bridge = TransformerBridge.boot_transformers(str(path), hf_model=reference, device="cpu")
    ours = fk.from_pretrained(path).eval()
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(tokens)
    logits, cache = run_with_cache(ours, tokens)
    return request.param, ours, tokens, (logits, cache), (tl_logits, tl_cache)


def shared_names(kind: str) -> list[str]:
    """The hook names both libraries have, under the same name and shape (pre-RoPE q/k for Llama)."""
    out = ["hook_embed"] + (["hook_pos_embed"] if kind == "gpt2" else []) + ["ln_final.hook_scale"]
    for i in range(2):
        out += [f"blocks.{i}.{n}" for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                                            "hook_mlp_out", "ln1.hook_scale", "ln2.hook_scale", "attn.hook_q",
                                            "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
                                            "attn.hook_pattern", "attn.hook_z",
                                            "mlp.hook_pre", "mlp.hook_post")]
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; masked attention scores (float32's minimum in both) compare as equal."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.clamp(min=-1e30) - b.detach().clamp(min=-1e30)).abs().max().item()


def test_logits_and_every_shared_activation(both):
    kind, _, _, (logits, cache), (tl_logits, tl_cache) = both
    assert diff(logits, tl_logits) < TOL
    worst = {name: diff(cache[name], tl_cache[name]) for name in shared_names(kind)}
    assert max(worst.values()) < TOL, {n: d for n, d in worst.items() if d >= TOL}


def test_residual_stream_methods(both):
    kind, _, tokens, (_, cache), (_, tl_cache) = both
    for kwargs in ({}, {"apply_ln": True}, {"incl_mid": True}, {"layer": 1, "apply_ln": True, "mlp_input": True}):
        ours, labels = cache.accumulated_resid(return_labels=True, **kwargs)
        theirs, tl_labels = tl_cache.accumulated_resid(return_labels=True, **kwargs)
        assert labels == tl_labels and diff(ours, theirs) < TOL, kwargs
    for kwargs in ({}, {"apply_ln": True}, {"mode": "attn"}, {"layer": 1, "mlp_input": True, "apply_ln": True}):
        ours, labels = cache.decompose_resid(return_labels=True, **kwargs)
        theirs, tl_labels = tl_cache.decompose_resid(return_labels=True, **kwargs)
        assert labels == tl_labels and diff(ours, theirs) < TOL, kwargs
    parts = cache.decompose_resid()
    tl_parts = tl_cache.decompose_resid()
    assert diff(cache.logit_attrs(parts, tokens), tl_cache.logit_attrs(tl_parts, tokens)) < TOL
    assert diff(cache.logit_attrs(parts, tokens, incorrect_tokens=tokens.flip(-1)),
                tl_cache.logit_attrs(tl_parts, tokens, incorrect_tokens=tokens.flip(-1))) < TOL
    assert diff(cache.logit_attrs(parts[:, :, -1], tokens[:, 0], pos_slice=-1),
                tl_cache.logit_attrs(tl_parts[:, :, -1], tokens[:, 0], pos_slice=-1)) < TOL


def test_logit_lens(both):
    _, ours, _, (logits, cache), (_, tl_cache) = both
    lens, labels = logit_lens(ours, cache)
    tl_stack = tl_cache.accumulated_resid(apply_ln=True)
    W_U = ours.lm_head.proj.weight.T
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert diff(lens, tl_stack @ W_U) < TOL and diff(lens[-1], logits) < TOL


def test_stack_head_results(both):
    _, _, _, (_, cache), (_, tl_cache) = both
    for kwargs in ({}, {"incl_remainder": True}, {"layer": 1, "apply_ln": True}, {"pos_slice": -1}):
        ours, labels = cache.stack_head_results(return_labels=True, **kwargs)
        theirs, tl_labels = tl_cache.stack_head_results(return_labels=True, **kwargs)
        assert labels == tl_labels and diff(ours, theirs) < TOL, kwargs


def test_per_head_results_equal_transformer_lens_head_stack(both):
    _, ours, tokens, _, (_, tl_cache) = both
    _, cache = run_with_cache(ours, tokens, names_filter=lambda n: n.endswith("hook_result"))
    theirs = tl_cache.stack_head_results()  # (layers * heads, batch, pos, d_model), from z and W_O
    ours_stacked = torch.cat([cache["result", i].permute(2, 0, 1, 3) for i in range(2)])
    assert diff(ours_stacked, theirs) < TOL


@pytest.mark.parametrize("kwargs", [{}, {"apply_ln": True}, {"layer": 1, "mlp_input": True}, {"expand_neurons": False},
                                    {"layer": 0}, {"layer": 1, "pos_slice": -1}])
def test_full_resid_decomposition(both, kwargs):
    _, _, _, (_, cache), (_, tl_cache) = both
    ours, labels = cache.get_full_resid_decomposition(return_labels=True, **kwargs)
    theirs, tl_labels = tl_cache.get_full_resid_decomposition(return_labels=True, **kwargs)
    assert labels == tl_labels and diff(ours, theirs) < TOL


def test_stack_neuron_results(both):
    _, _, _, (_, cache), (_, tl_cache) = both
    for kwargs in ({"layer": -1}, {"layer": 1, "incl_remainder": True},
                   {"layer": 2, "neuron_slice": [3, 5], "apply_ln": True}):
        ours, labels = cache.stack_neuron_results(return_labels=True, **kwargs)
        theirs, tl_labels = tl_cache.stack_neuron_results(return_labels=True, **kwargs)
        assert labels == tl_labels and diff(ours, theirs) < TOL, kwargs
