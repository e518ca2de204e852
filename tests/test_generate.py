"""Generation: the cached loop against transformers, against full recomputation, and row by row.

The reference for every cached result is either transformers' ``generate`` on the same
weights or ``_brute``: a loop that recomputes the whole sequence every step and applies
the same logits processors with a generator seeded the same way.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

import formerkit as fk
from conftest import ScriptedTokens, reinit_for_parity, require
from formerkit.generate.command import add_generate_command
from formerkit.generate.config import GenerationConfig
from formerkit.generate.decode import generate, stream
from formerkit.generate.processors import choose, process
from formerkit.generate.text import generate_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=64,
             tie_embeddings=False)  # tied tiny random models repeat their last token; untied ones vary
DECODERS = {
    "gpt2": ("gpt2", {}),
    "llama-gqa": ("llama", {"n_kv_heads": 2}),
    "alibi": ("gpt2", {"position": "alibi"}),
    "sinusoidal": ("gpt2", {"position": "sinusoidal"}),
    "nope": ("gpt2", {"position": "none"}),
}
ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47]]  # ragged prompts
SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy CPU


def _decoder(name: str, **kw) -> fk.Transformer:
    preset, overrides = DECODERS[name]
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **overrides, **kw})).eval()


def _left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    return ids, mask


@torch.no_grad()
def _brute(model, rows, max_new_tokens, *, eos=None, seed=None, pad=0, **sampling) -> torch.Tensor:
    """Generate by recomputing the whole left-padded batch every step (no cache)."""
    cfg = GenerationConfig(**sampling)
    ids, mask = _left_pad(rows, pad)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    live = torch.ones(len(rows), dtype=torch.bool)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool)
        for b in range(len(rows)):
            seen[b, ids[b][mask[b] == 1]] = True
        tokens = choose(process(logits, cfg, seen if cfg.repetition_penalty != 1 else None), cfg, generator)
        tokens = torch.where(live, tokens, pad)
        ids, mask = torch.cat([ids, tokens[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if eos is not None:
            live &= tokens != eos
        if not live.any():
            break
    return ids


# ---- transformers parity ------------------------------------------------------------------


def _hf_models():
    transformers = require("transformers")
    transformers.logging.set_verbosity_error()
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    llama = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48, vocab_size=96,
                                     max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    mistral = transformers.MistralConfig(**llama.to_diff_dict() | {"sliding_window": 5})
    return {"gpt2": lambda: transformers.GPT2LMHeadModel(gpt2),
            "llama-gqa": lambda: transformers.LlamaForCausalLM(llama),
            "mistral-sliding-window": lambda: transformers.MistralForCausalLM(mistral)}


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-sliding-window"])
def test_greedy_equals_transformers(name, tmp_path):
    torch.manual_seed(0)
    reference = reinit_for_parity(_hf_models()[name]()).eval()
    reference.save_pretrained(tmp_path)
    reference.generation_config.pad_token_id = 0
    reference.generation_config.eos_token_id = None  # never stop early
    model = fk.from_pretrained(tmp_path)
    assert model.config.eos_token_id == 2  # read from config.json: generate stops there unless told otherwise
    ids, mask = _left_pad(ROWS)
    expected = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    assert expected.shape == (3, 8 + 20)
    config = fk.GenerationConfig(max_new_tokens=20, eos_token_id=())
    assert torch.equal(generate(model, ROWS, config), expected)
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[]), expected)
    single = reference.generate(torch.tensor([ROWS[0]]), do_sample=False, max_new_tokens=20)
    assert torch.equal(generate(model, [ROWS[0]], config), single)


# ---- the cache against full recomputation ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_cached_equals_full_recomputation(name):
    model = _decoder(name)
    rows = [r[:6] for r in ROWS]
    assert torch.equal(generate(model, rows, max_new_tokens=8), _brute(model, rows, 8))
    sampled = generate(model, rows, max_new_tokens=8, seed=3, **SAMPLING)
    assert torch.equal(sampled, _brute(model, rows, 8, seed=3, **SAMPLING))
    assert torch.equal(sampled, generate(model, rows, max_new_tokens=8, seed=3, **SAMPLING))  # same seed, same text


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "alibi", "sinusoidal"])
def test_batch_rows_equal_each_row_alone(name):
    model = _decoder(name)
    free = generate(model, [ROWS[1]], max_new_tokens=10)[0, 3:].tolist()
    eos = free[3]  # the second row reaches this id early and stops
    batch = generate(model, ROWS, max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
    width = batch.shape[1]
    for b, row in enumerate(ROWS):
        alone = generate(model, [row], max_new_tokens=10, eos_token_id=eos, pad_token_id=1)[0].tolist()
        padded_alone = alone + [1] * (width - (8 - len(row)) - len(alone))
        assert batch[b, 8 - len(row):].tolist() == padded_alone
        assert batch[b, :8 - len(row)].tolist() == [1] * (8 - len(row))  # left padding with the pad id
    stopped = batch[1, 8:].tolist()  # the second row's new tokens
    assert eos in stopped and stopped[stopped.index(eos) + 1:] == [1] * (len(stopped) - stopped.index(eos) - 1)
    assert torch.equal(batch, _brute(model, ROWS, 10, eos=eos, pad=1))


def test_training_mode_and_grad_mode_are_restored():
    model = _decoder("gpt2").train()  # the gpt2 preset has dropout: generation must switch it off
    tokens = stream(model, [ROWS[0]], max_new_tokens=5)
    first = next(tokens)
    assert model.training and torch.is_grad_enabled()  # nothing leaks out of a paused stream
    assert [int(t[0]) for t in [first, *tokens]] == generate(model.eval(), [ROWS[0]], max_new_tokens=5)[0, 6:].tolist()
    model.train()
    generate(model, [ROWS[0]], max_new_tokens=3)
    assert model.training


def test_learned_positions_limit_and_unlimited_schemes():
    gpt2 = _decoder("gpt2", max_seq_len=16)
    with pytest.raises(fk.InputError, match=r"\(6 tokens\) \+ max_new_tokens=11 = 17 exceeds .*max_seq_len=16"):
        generate(gpt2, [ROWS[0]], max_new_tokens=11)
    assert generate(gpt2, [ROWS[0]], max_new_tokens=10).shape == (1, 16)
    llama = _decoder("llama-gqa", max_seq_len=16)  # rope: the cache is sized to the request, no limit
    out = generate(llama, [ROWS[0]], max_new_tokens=20)
    assert out.shape == (1, 26)
    assert torch.equal(out, _brute(llama, [ROWS[0]], 20))


# ---- stopping --------------------------------------------------------------------------------


def test_eos_and_stop_sequences():
    model = _decoder("llama-gqa")
    free = generate(model, [ROWS[0]], max_new_tokens=12)[0, 6:].tolist()
    i = next(i for i in range(2, 12) if free[i] not in free[:i])
    out = generate(model, [ROWS[0]], max_new_tokens=12, eos_token_id=[63, free[i]])
    assert out[0, 6:].tolist() == free[:i + 1]  # the EOS is kept, and the loop ends early
    j = next(j for j in range(1, 11) if (free[j], free[j + 1]) not in list(zip(free[:j], free[1:j + 1], strict=True)))
    out = generate(model, [ROWS[0]], max_new_tokens=12, stop=[[63, 62], free[j:j + 2]])
    assert out[0, 6:].tolist() == free[:j + 2]


def test_stop_strings_cut_text_per_row():
    tokenizer = fk.CharTokenizer.from_texts(["abcdefghij ."])
    model = _decoder("gpt2", vocab_size=tokenizer.vocab_size)
    prompts = ["abc", "fed c"]
    free = [tokenizer.decode(_brute(model, [tokenizer.encode(p)], 12)[0, len(p):]) for p in prompts]
    stop = free[0][4:6]
    expected = [p + (t[:t.find(stop)] if stop in t else t) for p, t in zip(prompts, free, strict=True)]
    texts = generate_text(model, tokenizer, prompts, max_new_tokens=12, stop_strings=[stop], eos_token_id=())
    assert texts == expected and all(len(t) < len(p) + 10 for p, t in zip(prompts, texts, strict=True))
    assert "".join(generate_text(model, tokenizer, prompts[0], max_new_tokens=12, stop_strings=stop,
                                 eos_token_id=(), stream=True)) == expected[0]


def test_scripted_text_stops_at_eos_and_stop_string():
    tokenizer = fk.ByteTokenizer()
    model = _decoder("gpt2", vocab_size=tokenizer.vocab_size)
    script = ScriptedTokens(model, list(b"one\n\ntwo") + [tokenizer.eos_id])
    assert generate_text(model, tokenizer, "> ", max_new_tokens=20) == "> one\n\ntwo"
    script.calls = 0
    pieces = list(generate_text(model, tokenizer, "> ", max_new_tokens=20, stop_strings=["\n\n"], stream=True))
    assert "".join(pieces) == "> one" and not any("\n" in p for p in pieces)  # no half stop string shown


# ---- streaming -----------------------------------------------------------------------------


def test_stream_yields_the_generated_columns():
    model = _decoder("gpt2")
    batch = generate(model, ROWS, max_new_tokens=6, seed=5, **SAMPLING)
    steps = list(stream(model, ROWS, max_new_tokens=6, seed=5, **SAMPLING))
    assert torch.equal(torch.stack(steps, 1), batch[:, 8:])
    single = list(stream(model, [ROWS[2]], max_new_tokens=6))
    assert all(isinstance(t, torch.Tensor) and t.shape == (1,) and t.dtype == torch.long for t in single)
    assert torch.equal(torch.stack(single, 1), generate(model, [ROWS[2]], max_new_tokens=6)[:, 8:])


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_streamed_text_never_splits_a_character(kind):
    text = "hé€ abc"
    tokenizer = fk.ByteTokenizer() if kind == "byte" else fk.train_bpe(["héllo wörld € " * 20], 300)
    model = _decoder("gpt2", vocab_size=tokenizer.vocab_size)
    script = ScriptedTokens(model, tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_id])
    pieces = list(generate_text(model, tokenizer, "→", max_new_tokens=20, stream=True))
    assert "".join(pieces) == "→" + text and not any("\ufffd" in p for p in pieces)
    if kind == "byte":  # one piece per character, though é and € take two and three tokens
        assert pieces == ["→", "h", "é", "€", " ", "a", "b", "c"]
    script.calls = 0
    assert generate_text(model, tokenizer, "→", max_new_tokens=20) == "→" + text


def test_generate_text_batches_and_empty_prompt():
    tokenizer = fk.ByteTokenizer()
    model = _decoder("llama-gqa", vocab_size=tokenizer.vocab_size)
    texts = generate_text(model, tokenizer, ["hi", "a longer prompt", ""], max_new_tokens=8, eos_token_id=[])
    for prompt, text in zip(["hi", "a longer prompt", ""], texts, strict=True):
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
        alone = _brute(model, [ids], 8)[0, len(ids):]
        assert text == prompt + tokenizer.decode(alone)


# ---- sampling statistics --------------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # a fixed next-token distribution


def _draws(**sampling) -> torch.Tensor:
    """3000 draws from LOGITS through generate: 1000 rows, 3 tokens each."""
    model = _decoder("nope", vocab_size=len(LOGITS))
    model.lm_head.register_forward_hook(lambda module, inputs, out: LOGITS.expand(out.shape))
    return generate(model, [[0]] * 1000, max_new_tokens=3, seed=0, **sampling)[:, 1:].flatten()


def test_sampling_frequencies_match_softmax():
    draws = _draws(temperature=1.5)
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    expected = (LOGITS / 1.5).softmax(-1).double() * draws.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def test_top_k_and_top_p_stay_inside_their_sets():
    assert set(_draws(temperature=1.0, top_k=3).tolist()) == {0, 1, 2}
    probs = LOGITS.softmax(-1)  # 0.405, 0.245, 0.149, 0.090, ...: the 70% nucleus is the first three
    assert float(probs[:2].sum()) < 0.7 <= float(probs[:3].sum())
    assert set(_draws(temperature=1.0, top_p=0.7).tolist()) == {0, 1, 2}
    assert set(_draws(temperature=1.0, min_p=0.2).tolist()) == {i for i in range(8) if probs[i] >= 0.2 * probs[0]}
    assert set(_draws(temperature=1.0, min_p=0.2).tolist()) == {0, 1, 2, 3}


# ---- encoder-decoder -------------------------------------------------------------------------


def test_encoder_decoder_greedy_equals_recomputation():
    torch.manual_seed(11)  # post-norm tiny models saturate at the default init; this one varies by source
    cfg = fk.ModelConfig.from_preset("vaswani-base", **{**SMALL, "n_decoder_layers": 3, "init_std": 0.1})
    model = fk.Transformer(cfg).eval()
    sources = [[5, 6, 7, 8, 9], [10, 11, 12]]
    src = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])  # encoder sources are padded on the right
    src_mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    tgt = torch.full((2, 1), 1)
    with torch.no_grad():
        for _ in range(10):
            logits = model(src, src_mask, decoder_input_ids=tgt).logits[:, -1]
            tgt = torch.cat([tgt, logits.argmax(-1, keepdim=True)], 1)
    out = generate(model, sources, max_new_tokens=10, decoder_start_token_id=1)
    assert torch.equal(out, tgt) and not torch.equal(tgt[0], tgt[1])
    assert torch.equal(generate(model, [sources[1]], max_new_tokens=10, decoder_start_token_id=1)[0], tgt[1])
    assert torch.equal(generate(model, src, attention_mask=src_mask, max_new_tokens=10, decoder_start_token_id=1),
                       tgt)
    eos = int(tgt[0, 3])
    stopped = generate(model, [sources[0]], max_new_tokens=10, decoder_start_token_id=1, eos_token_id=eos)
    assert stopped[0].tolist() == tgt[0, :tgt[0, 1:].tolist().index(eos) + 2].tolist()


def test_encoder_decoder_text_is_the_target_only():
    tokenizer = fk.ByteTokenizer()
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("vaswani-base", **{**SMALL, "vocab_size": 259})).eval()
    ids = generate(model, [tokenizer.encode("source")], max_new_tokens=6, decoder_start_token_id=tokenizer.pad_id)
    expected = tokenizer.decode(ids[0, 1:])  # decoding started from the pad id, as in T5
    assert generate_text(model, tokenizer, "source", max_new_tokens=6, eos_token_id=[]) == expected


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=[[]]), "prompt 0 is empty"),
    (dict(input_ids=[]), "non-empty list"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "prompt is empty"),
    (dict(input_ids=[[1, 64]]), r"token id 64, outside the vocabulary \[0, 64\)"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(eos_token_id=99), r"eos_token_id=99 is outside the vocabulary"),
    (dict(stop=[[]]), "non-empty list of token ids"),
    (dict(input_ids=torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]])), "LEFT padding"),
    (dict(input_ids=[[1, 2]], attention_mask=torch.ones(1, 2)), "padding is built for you"),
])
def test_bad_inputs(kwargs, message):
    model = _decoder("gpt2")
    kwargs = {"input_ids": [[1, 2, 3]], **kwargs}
    with pytest.raises(fk.InputError, match=message):
        generate(model, kwargs.pop("input_ids"), **kwargs)


def test_bad_models_and_prompts():
    torch.manual_seed(0)
    encoder = fk.Transformer(fk.ModelConfig.from_preset("minilm-l6", **SMALL))
    with pytest.raises(fk.InputError, match="kind='encoder'"):
        generate(encoder, [[1, 2]])
    with pytest.raises(fk.InputError, match="stream=True takes a single prompt"):
        generate_text(_decoder("gpt2", vocab_size=259), fk.ByteTokenizer(), ["a", "b"], stream=True)
    with pytest.raises(fk.InputError, match="stop_strings must be a list of non-empty strings"):
        generate_text(_decoder("gpt2", vocab_size=259), fk.ByteTokenizer(), "a", stop_strings=[""])


# ---- command line ----------------------------------------------------------------------------


def _run_cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", *argv])
    args.func(args)
    return capsys.readouterr().out


def test_cli_generate(tmp_path, capsys):
    tokenizer = fk.ByteTokenizer()
    model = _decoder("llama-gqa", vocab_size=tokenizer.vocab_size)
    fk.save_pretrained(model, tmp_path)
    tokenizer.save(tmp_path)
    base = ["--checkpoint", str(tmp_path), "--max-new-tokens", "12"]
    greedy = generate_text(model, tokenizer, "Hi", max_new_tokens=12)
    assert _run_cli([*base, "--prompt", "Hi"], capsys) == greedy + "\n"
    sampled = [*base, "--prompt", "Hi", "--temperature", "1.0", "--top-p", "0.95", "--seed", "7"]
    first = _run_cli(sampled, capsys)
    assert first == _run_cli(sampled, capsys) == _run_cli([*sampled, "--no-stream"], capsys)
    assert first == generate_text(model, tokenizer, "Hi", max_new_tokens=12, temperature=1.0, top_p=0.95,
                                  seed=7) + "\n"
    out = _run_cli([*base, "--prompt", "a", "--prompt", "bc"], capsys)
    texts = generate_text(model, tokenizer, ["a", "bc"], max_new_tokens=12)
    assert out == f"--- 1 ---\n{texts[0]}\n--- 2 ---\n{texts[1]}\n"
