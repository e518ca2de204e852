"""Jacobi decoding gives greedy decoding's output exactly, in at most as many forward passes."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from formerkit.errors import InputError
from formerkit.generate import generate
from formerkit.generate.jacobi import jacobi_generate

VOCAB = 40
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy CPU
GENERATING = ["vaswani-base", "gpt2", "bart-base", "t5-small", "t5-v1.1-small", "llama"]


def build(preset: str, seed: int = 0) -> fk.Transformer:
    torch.manual_seed(seed)
    extra = {"n_decoder_layers": 2} if preset in ("vaswani-base", "bart-base", "t5-small", "t5-v1.1-small") else {}
    extra |= {"n_kv_heads": 2} if preset == "llama" else {}
    cfg = fk.ModelConfig.from_preset(preset, n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=VOCAB,
                                     max_seq_len=48, init_std=0.5, **extra)
    return fk.Transformer(cfg).eval()


@pytest.mark.parametrize("preset, block_size", [(p, 4) for p in GENERATING]
                         + [("gpt2", 1), ("gpt2", 9), ("t5-small", 2), ("t5-small", 8)])
def test_equals_greedy_on_every_generating_preset(preset, block_size):
    model = build(preset)
    prompts = [[5, 9, 11, 3, 7], [8, 2]]  # a ragged batch: left padding for decoders
    for eos in (None, 6):
        expected = generate(model, prompts, max_new_tokens=14, eos_token_id=eos)
        out = jacobi_generate(model, prompts, max_new_tokens=14, eos_token_id=eos, block_size=block_size)
        assert torch.equal(out.sequences, expected), (preset, block_size, eos)
        assert out.forward_passes <= out.new_tokens and out.new_tokens == expected.shape[1] - (
            1 if model.config.kind == "encoder-decoder" else 5)


def test_block_size_one_is_one_pass_per_token():
    out = jacobi_generate(build("gpt2"), [[1, 2, 3]], max_new_tokens=9, block_size=1, eos_token_id=None)
    assert out.forward_passes == out.new_tokens == 9 and out.tokens_per_pass == 1.0


def test_predictable_continuations_take_fewer_passes():
    model = build("llama")
    with torch.no_grad():  # all logits 0: greedy repeats token 0 (argmax takes the first), Jacobi accepts blocks
        model.lm_head.proj.weight.zero_()
    ids = [[1, 2, 4]]
    expected = generate(model, ids, max_new_tokens=30, eos_token_id=None)
    out = jacobi_generate(model, ids, max_new_tokens=30, eos_token_id=None, block_size=8)
    assert torch.equal(out.sequences, expected)
    assert out.forward_passes <= 6 and out.tokens_per_pass >= 5  # prefill, one round to learn, then 8 a pass


@pytest.mark.parametrize("options, message", [
    ({"num_beams": 2}, "beam search"), ({"temperature": 0.7}, "sampling"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"block_size": 0}, "block_size must be"),
    ({"stop": [[1, 2]]}, "stop"),
])
def test_refusals(options, message):
    with pytest.raises(InputError, match=message):
        jacobi_generate(build("gpt2"), [[1, 2]], max_new_tokens=4, **options)


def test_encoder_only_models_are_refused():
    model = fk.Transformer(fk.ModelConfig.from_preset("bert-base", n_layers=1, d_model=16, n_heads=2, d_ff=32,
                                                      vocab_size=VOCAB, max_seq_len=16))
    with pytest.raises(InputError, match="language-model head"):
        jacobi_generate(model, [[1, 2]], max_new_tokens=4)
