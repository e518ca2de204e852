"""Fuzzing the generation options of fk.generate, fk.generate_text and fk.beam_search on tiny models: every call
either succeeds with a well-formed result or raises one of formerkit's own errors (FormerkitError).

The tests use the public keyword API only, so a new options object behind it changes nothing here."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formerkit as fk

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENIZER = fk.ByteTokenizer()
VOCAB = TOKENIZER.vocab_size
SMALL = dict(n_layers=1, d_model=16, n_heads=2, d_ff=24, vocab_size=VOCAB, max_seq_len=40)
JUNK = st.one_of(st.text(max_size=2), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                 st.lists(st.integers(0, 3), max_size=2), st.just(2.5))


@functools.cache
def tiny(name: str) -> fk.Transformer:
    """A tiny byte-level model: "gpt2" (learned positions, max_seq_len 40), "llama" (RoPE) or "seq2seq"."""
    torch.manual_seed(0)
    preset = {"gpt2": "gpt2", "llama": "llama", "seq2seq": "vaswani-base"}[name]
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **SMALL)).eval()


def _ids(high: int = VOCAB + 1) -> st.SearchStrategy:
    """Token ids, now and then outside the vocabulary."""
    return st.integers(0, VOCAB - 1) | st.integers(-2, high)


def _unit(low: float = -0.5, high: float = 1.5) -> st.SearchStrategy:
    """Numbers around [0, 1], now and then not finite or not a number at all."""
    return st.none() | st.floats(low, high) | st.sampled_from([0.0, 1.0, math.nan, math.inf]) | JUNK


SAMPLING = {
    "max_new_tokens": st.integers(-1, 12) | JUNK,
    "temperature": st.floats(0.0, 3.0) | st.sampled_from([0.0, 1e-30, -1.0, math.nan, math.inf]) | JUNK,
    "top_k": st.none() | st.integers(-1, VOCAB + 5) | JUNK,
    "top_p": _unit(),
    "min_p": _unit(),
    "repetition_penalty": st.floats(0.0, 3.0) | st.sampled_from([-1.0, math.nan, math.inf]) | JUNK,
    "eos_token_id": st.none() | _ids() | st.lists(_ids(), max_size=3) | JUNK,
    "pad_token_id": st.none() | _ids() | JUNK,
    "seed": st.none() | st.integers(-(2**70), 2**70) | JUNK,
}
GENERATE = {**SAMPLING, "stop": st.none() | st.lists(st.lists(_ids(), max_size=3), max_size=2) | JUNK,
            "decoder_start_token_id": st.none() | _ids() | JUNK}
TEXT = {**SAMPLING, "stop_strings": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2) | JUNK,
        "truncate": st.none() | st.sampled_from(["left", "right", "middle"]), "heal": st.booleans()}
BEAM = {"max_new_tokens": SAMPLING["max_new_tokens"], "eos_token_id": SAMPLING["eos_token_id"],
        "pad_token_id": SAMPLING["pad_token_id"], "decoder_start_token_id": GENERATE["decoder_start_token_id"],
        "num_beams": st.integers(-1, 5) | JUNK, "num_return_sequences": st.integers(-1, 5) | JUNK,
        "length_penalty": st.floats(-2.0, 2.0) | st.sampled_from([math.nan, math.inf]) | JUNK,
        "early_stopping": st.booleans() | st.just("never") | JUNK}


@st.composite
def prompts(draw: st.DrawFn) -> list[list[int]] | torch.Tensor:
    """Prompts as lists of ids (ragged, sometimes empty or out of range) or as a (B, T) tensor."""
    rows = draw(st.lists(st.lists(_ids(), min_size=0, max_size=12), min_size=0, max_size=3))
    if rows and all(rows) and len({len(r) for r in rows}) == 1 and draw(st.booleans()):
        return torch.tensor(rows)
    return rows


def _options(table: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=table)


def _check_ids(out: torch.Tensor, rows: int, prompt_len: int, max_new_tokens: int) -> None:
    """A generated (rows, prompt_len + n) long tensor of token ids, n <= max_new_tokens."""
    assert out.dtype == torch.long and out.dim() == 2 and out.shape[0] == rows
    assert prompt_len <= out.shape[1] <= prompt_len + max_new_tokens
    assert bool(((out >= 0) & (out < VOCAB)).all())


@FUZZ
@given(st.sampled_from(["gpt2", "llama", "seq2seq"]), prompts(), _options(GENERATE))
def test_generate_succeeds_or_raises_formerkit_errors(one_thread, name, input_ids, options):
    model = tiny(name)
    try:
        out = fk.generate(model, input_ids, **options)
    except fk.FormerkitError:
        return
    width = 1 if model.config.kind == "encoder-decoder" else max(len(r) for r in input_ids)
    _check_ids(out, len(input_ids), width, options.get("max_new_tokens", 50))


@FUZZ
@given(st.sampled_from(["gpt2", "llama", "seq2seq"]), st.lists(st.text(max_size=12), max_size=3) | st.text(max_size=12),
       st.booleans(), _options(TEXT))
def test_generate_text_succeeds_or_raises_formerkit_errors(one_thread, name, prompt, stream, options):
    model = tiny(name)
    try:
        out = fk.generate_text(model, TOKENIZER, prompt, stream=stream and isinstance(prompt, str), **options)
        texts = ["".join(out)] if stream and isinstance(prompt, str) else out
    except fk.FormerkitError:
        return
    texts = [texts] if isinstance(texts, str) else texts
    assert isinstance(texts, list) and len(texts) == (1 if isinstance(prompt, str) else len(prompt))
    assert all(isinstance(t, str) for t in texts)


@FUZZ
@given(st.sampled_from(["gpt2", "llama", "seq2seq"]), prompts(), _options(BEAM))
def test_beam_search_succeeds_or_raises_formerkit_errors(one_thread, name, input_ids, options):
    model = tiny(name)
    try:
        out = fk.beam_search(model, input_ids, **options)
    except fk.FormerkitError:
        return
    n, rows = options.get("num_return_sequences", 1), len(input_ids)
    width = 1 if model.config.kind == "encoder-decoder" else max(len(row) for row in input_ids)  # lists: left-padded
    _check_ids(out.sequences, rows * n, width, options.get("max_new_tokens", 50))
    assert out.scores.shape == (rows * n,)


# ---- what the fuzzing found, kept as plain regression tests ------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"temperature": ""}, "temperature must be a finite number, got ''"),  # was a TypeError from a comparison
    ({"temperature": math.nan, "max_new_tokens": 1}, "temperature must be a finite number, got nan"),  # NaN probs
    ({"top_k": 2.5}, "top_k must be an integer >= 1 or None"),  # was a TypeError from topk
    ({"top_p": "0.9"}, "top_p must be a finite number or None"),
    ({"repetition_penalty": math.nan}, "repetition_penalty must be a finite number, got nan"),
])
def test_sampling_options_of_the_wrong_kind_are_input_errors(options, message):
    with pytest.raises(fk.InputError, match=message):
        fk.generate(tiny("gpt2"), [[1, 2]], **options)


def test_generate_text_checks_max_new_tokens_before_truncating():
    """A non-integer max_new_tokens with truncate= gave a TypeError while fitting the prompt."""
    with pytest.raises(fk.InputError, match="max_new_tokens must be an integer >= 0, got ''"):
        fk.generate_text(tiny("gpt2"), TOKENIZER, "hi", max_new_tokens="", truncate="left")


@pytest.mark.parametrize("options, message", [
    ({"num_beams": 2.5}, "num_beams must be an integer >= 1"),  # TypeError from repeat_interleave
    ({"num_return_sequences": 2.5, "max_new_tokens": 0}, r"num_return_sequences must be in \[1, num_beams=4\]"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0, got 2.5"),  # TypeError from torch.zeros
    ({"length_penalty": ""}, "length_penalty must be a finite number, got ''"),  # TypeError from **
    ({"eos_token_id": 0.0}, "eos_token_id must be a token id or a list of token ids"),  # 'float' is not iterable
    ({"pad_token_id": VOCAB}, r"pad_token_id=259 is outside the vocabulary \[0, 259\)"),  # filled the output
    ({"decoder_start_token_id": -1}, r"decoder_start_token_id must be an integer >= 0 or None, got -1"),
])
def test_beam_options_of_the_wrong_kind_are_input_errors(options, message):
    name = "seq2seq" if "decoder_start_token_id" in options else "gpt2"
    with pytest.raises(fk.InputError, match=message):
        fk.beam_search(tiny(name), torch.tensor([[1, 2]]), **options)
