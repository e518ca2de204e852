"""A prompt too long for the context: correct advice in the error, or ``truncate`` keeping the right tokens."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from formerkit.generate.decode import generate
from formerkit.generate.translate import beam_texts

CONTEXT = 16


@pytest.fixture(scope="module")
def setup(one_thread):
    tokenizer = fk.CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz"])
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("gpt2", n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=CONTEXT,
                                     vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    return fk.Transformer(cfg).eval(), tokenizer


PROMPT = "abcdefghijklmnopqrst"  # 20 characters, one token each


def test_the_error_says_by_how_much_and_what_fits(setup):
    model, tokenizer = setup
    with pytest.raises(fk.InputError, match=r"\(20 tokens\) \+ max_new_tokens=4 = 24 exceeds this model's "
                                            r"max_seq_len=16 \(learned positions\) by 8; shorten the prompt by 8 "
                                            r"tokens, to 12 \(truncate='left' or 'right'.*--truncate") as err:
        fk.generate_text(model, tokenizer, PROMPT, max_new_tokens=4)
    assert "lower max_new_tokens" not in str(err.value)  # no number of new tokens makes a 20-token prompt fit
    with pytest.raises(fk.InputError, match=r"= 20 exceeds .* by 4; shorten the prompt by 4 tokens, to 16") as err:
        fk.generate_text(model, tokenizer, PROMPT, max_new_tokens=0)
    assert "max_new_tokens to 0" not in str(err.value)
    with pytest.raises(fk.InputError, match=r"by 2; shorten the prompt by 2 tokens, to 8 .*, or lower "
                                            r"max_new_tokens to 6"):
        fk.generate_text(model, tokenizer, PROMPT[:10], max_new_tokens=8)
    with pytest.raises(fk.InputError, match=r"lower max_new_tokens below 16 and shorten the prompt"):
        generate(model, [tokenizer.encode(PROMPT)], max_new_tokens=16)


@pytest.mark.parametrize("side, kept", [("left", PROMPT[-12:]), ("right", PROMPT[:12])])
def test_truncate_keeps_the_tokens_of_its_side(setup, side, kept):
    model, tokenizer = setup
    text = fk.generate_text(model, tokenizer, PROMPT, max_new_tokens=4, truncate=side)
    assert text == fk.generate_text(model, tokenizer, kept, max_new_tokens=4)
    assert text.startswith(kept)
    streamed = "".join(fk.generate_text(model, tokenizer, PROMPT, max_new_tokens=4, truncate=side, stream=True))
    assert streamed == text
    assert beam_texts(model, tokenizer, [PROMPT], num_beams=2, max_new_tokens=4, truncate=side)[0].startswith(kept)


def test_truncate_leaves_prompts_that_fit_alone(setup):
    model, tokenizer = setup
    texts = fk.generate_text(model, tokenizer, [PROMPT, "xyz"], max_new_tokens=4, truncate="left")
    assert texts[1] == fk.generate_text(model, tokenizer, "xyz", max_new_tokens=4)
    assert texts[0].startswith(PROMPT[-12:])


def test_bad_truncate_arguments(setup):
    model, tokenizer = setup
    with pytest.raises(fk.InputError, match='truncate must be "left", "right" or None, got \'middle\''):
        fk.generate_text(model, tokenizer, PROMPT, truncate="middle")
    with pytest.raises(fk.InputError, match=r"max_new_tokens=16 leaves no room for a prompt in this model's "
                                            r"max_seq_len=16; lower max_new_tokens \(--max-new-tokens\) to at most 15"):
        fk.generate_text(model, tokenizer, PROMPT, max_new_tokens=16, truncate="left")
