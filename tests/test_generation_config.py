"""GenerationConfig: one validated set of options for every generator; special ids from the checkpoint's config.

Checks validation messages (field and fix), keyword overrides with a "did you mean", the one
return type per call style, and that BART and T5 checkpoints stop at their own EOS without
being told, with the same eos/pad/decoder-start ids transformers' generation config takes.
"""

from __future__ import annotations

import os

import pytest
import torch

import formerkit as fk
from conftest import ScriptedTokens, require
from formerkit.generate import GenerationConfig, beam_search, generate, generate_text, stream
from formerkit.generate.config import special_ids, with_options

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=64)


def _model(preset: str = "gpt2", **kw) -> fk.Transformer:
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **kw})).eval()


# ---- validation, once, naming the field -------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an integer >= 0, got True"),
    (dict(temperature=-0.5), r"temperature must be >= 0 \(0: greedy\)"),
    (dict(temperature="hot"), r"temperature must be a finite number, got 'hot'"),
    (dict(top_k=0), r"top_k must be an integer >= 1 or None \(None: all tokens\), got 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0), r"repetition_penalty must be > 0 \(1: none\)"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(eos_token_id=[1, -2]), r"eos_token_id must be a token id or a list of token ids \(\[\] for none"),
    (dict(pad_token_id=-1), r"pad_token_id must be an integer >= 0 or None"),
    (dict(stop="\n"), r"stop must be a list of token-id sequences.*for text use stop_strings"),
    (dict(stop=[[]]), "each stop sequence must be a non-empty list of token ids"),
    (dict(stop_strings=[""]), "stop_strings must be a list of non-empty strings"),
    (dict(num_beams=0), r"num_beams must be an integer >= 1 \(1: no beam search\)"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences must be in \[1, num_beams=2\].*raise num_beams"),
    (dict(early_stopping="sometimes"), 'early_stopping must be True, False or "never"'),
    (dict(num_beams=4, temperature=0.8), r"beam search \(num_beams=4\).*does not sample; set temperature=0"),
    (dict(num_beams=2, repetition_penalty=1.2), r"does not apply repetition_penalty=1.2"),
    (dict(num_beams=2, stop_strings=["\n"]), "stops at EOS ids only"),
])
def test_bad_options_name_the_field_and_the_fix(options, message):
    with pytest.raises(fk.InputError, match=message):
        GenerationConfig(**options)
    with pytest.raises(fk.InputError, match=message):  # the same check, whichever way the option arrives
        generate(_model(), [[1, 2]], **options)


def test_unknown_option_suggests_the_field():
    with pytest.raises(fk.InputError, match=r"'max_tokens' is not a generation option \(did you mean "
                                            r"\"max_new_tokens\"\?\); the options are the GenerationConfig fields"):
        generate(_model(), [[1, 2]], max_tokens=5)
    with pytest.raises(fk.InputError, match=r"did you mean \"temperature\""):
        GenerationConfig().replace(temprature=0.5)
    with pytest.raises(fk.InputError, match="config must be a formerkit GenerationConfig, got dict"):
        generate(_model(), [[1, 2]], {"max_new_tokens": 5})


def test_options_override_the_config_and_normalize():
    base = GenerationConfig(max_new_tokens=7, temperature=0.5, eos_token_id=3, stop=[[1, 2]], stop_strings="\n")
    assert base.eos_token_id == (3,) and base.stop == ((1, 2),) and base.stop_strings == ("\n",)
    merged = with_options(base, {"temperature": 0.0})
    assert (merged.max_new_tokens, merged.temperature, merged.greedy) == (7, 0.0, True)
    assert with_options(None, {}) == GenerationConfig() and with_options(base, {}) is base
    model = _model(tie_embeddings=False)
    assert torch.equal(generate(model, [[5, 6]], GenerationConfig(max_new_tokens=6)),
                       generate(model, [[5, 6]], max_new_tokens=6))
    assert torch.equal(generate(model, [[5, 6]], base, temperature=0.0, eos_token_id=[], stop=[], stop_strings=[]),
                       generate(model, [[5, 6]], max_new_tokens=7))


# ---- special ids: config, else the model config, else the tokenizer ----------------------------


def test_special_ids_fall_back_in_order():
    cfg = fk.ModelConfig.from_preset("bart-base", **SMALL)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.decoder_start_token_id) == (2, 1, 2)
    assert special_ids(GenerationConfig(), cfg) == special_ids(GenerationConfig(), cfg, tokenizer_eos=9) \
        and special_ids(GenerationConfig(), cfg).eos == (2,)
    ids = special_ids(GenerationConfig(eos_token_id=[], pad_token_id=5, decoder_start_token_id=6), cfg)
    assert (ids.eos, ids.pad, ids.start) == ((), 5, 6)
    gpt = fk.ModelConfig.from_preset("gpt2", **SMALL)  # no ids of its own
    assert special_ids(GenerationConfig(), gpt) == special_ids(GenerationConfig(eos_token_id=[]), gpt)
    ids = special_ids(GenerationConfig(), gpt, tokenizer_eos=9, tokenizer_pad=None)
    assert (ids.eos, ids.pad) == ((9,), 9)  # pad: the first EOS id when nobody names one
    with pytest.raises(fk.InputError, match=r"pad_token_id=70 is outside the vocabulary \[0, 64\)"):
        special_ids(GenerationConfig(pad_token_id=70), gpt)
    with pytest.raises(fk.InputError, match=r"stop=64 is outside the vocabulary"):
        special_ids(GenerationConfig(stop=[[1, 64]]), gpt)
    with pytest.raises(fk.InputError, match="decoder_start_token_id is for encoder-decoder models"):
        special_ids(GenerationConfig(decoder_start_token_id=0), gpt)


def test_model_config_eos_field():
    assert fk.ModelConfig.from_preset("t5-small", **SMALL).eos_token_id == 1
    cfg = fk.ModelConfig.from_preset("llama", **SMALL, eos_token_id=(2, 3))
    assert cfg.eos_token_id == [2, 3] and fk.ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(fk.ConfigError, match=r"eos_token_id=64 is outside the vocabulary \[0, 64\)"):
        fk.ModelConfig.from_preset("llama", **SMALL, eos_token_id=64)
    with pytest.raises(fk.ConfigError, match="eos_token_id must be a token id, a non-empty list"):
        fk.ModelConfig.from_preset("llama", **SMALL, eos_token_id=[])
    hf = {"model_type": "llama", "vocab_size": 100, "eos_token_id": [2, 128009]}
    assert fk.config_from_hf(hf).eos_token_id == 2  # ids outside the vocabulary are dropped
    assert fk.config_from_hf({"model_type": "gpt2", "vocab_size": 100}).eos_token_id is None  # 50256: outside
    assert fk.config_from_hf({"model_type": "llama", "vocab_size": 100}).eos_token_id == 2  # the family default


@pytest.mark.parametrize("preset, eos", [("bart-base", 2), ("t5-small", 1)])
def test_encoder_decoder_checkpoints_stop_at_their_eos_untold(preset, eos, tmp_path):
    model = _model(preset, d_head=8) if preset == "t5-small" else _model(preset)
    fk.save_pretrained(model, tmp_path, format="hf")
    loaded = fk.from_pretrained(tmp_path)
    assert loaded.config.eos_token_id == eos
    script = ScriptedTokens(loaded, [10, 11, 12, eos, 13])
    out = generate(loaded, [[5, 6, 7], [8, 9]], max_new_tokens=10)
    assert out.tolist() == [[loaded.config.decoder_start_token_id, 10, 11, 12, eos]] * 2
    script.calls = 0
    beams = beam_search(loaded, [[5, 6, 7]], num_beams=2, max_new_tokens=10)
    assert beams.sequences.tolist() == [[loaded.config.decoder_start_token_id, 10, 11, 12, eos]]
    transformers = require("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reference = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(tmp_path))
    ids = special_ids(GenerationConfig(), loaded.config)
    assert (ids.eos, ids.pad, ids.start) == ((reference.eos_token_id,), reference.pad_token_id,
                                             reference.decoder_start_token_id)


# ---- one return type per call style ----------------------------------------------------------------


def test_return_types_are_stable():
    tokenizer = fk.ByteTokenizer()
    model = _model(vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    steps = list(stream(model, [[5, 6]], max_new_tokens=3))
    assert [(type(t), t.shape, t.dtype) for t in steps] == [(torch.Tensor, (1,), torch.long)] * 3
    steps = list(stream(model, [[5, 6], [7]], max_new_tokens=3))
    assert all(t.shape == (2,) for t in steps)
    assert isinstance(generate_text(model, tokenizer, "ab", max_new_tokens=3), str)
    for prompts in (["ab"], ["ab", "c"]):
        texts = generate_text(model, tokenizer, prompts, max_new_tokens=3)
        assert isinstance(texts, list) and len(texts) == len(prompts) and all(isinstance(t, str) for t in texts)
    pieces = generate_text(model, tokenizer, "ab", max_new_tokens=3, stream=True)
    assert "".join(pieces) == generate_text(model, tokenizer, "ab", max_new_tokens=3)
    beams = generate_text(model, tokenizer, ["ab", "c"], num_beams=2, max_new_tokens=3)
    assert isinstance(beams, list) and all(isinstance(t, str) for t in beams)
    assert isinstance(generate_text(model, tokenizer, "ab", num_beams=2, max_new_tokens=3), str)


def test_generate_with_beams_returns_beam_search_sequences():
    model = _model("llama", n_kv_heads=2, init_std=0.3)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    expected = beam_search(model, ids, num_beams=3, max_new_tokens=5, num_return_sequences=2).sequences
    assert torch.equal(generate(model, ids, num_beams=3, max_new_tokens=5, num_return_sequences=2), expected)
    with pytest.raises(fk.InputError, match="stream yields one token per step"):
        stream(model, ids, num_beams=3)
    with pytest.raises(fk.InputError, match="stop_strings are text: pass them to generate_text"):
        generate(model, ids, stop_strings=["x"])
    with pytest.raises(fk.InputError, match="drop stream=True, or set num_beams=1"):
        generate_text(model, fk.ByteTokenizer(), "a", num_beams=2, stream=True)
