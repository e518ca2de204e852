"""No silent surprises: settings that work but not as meant warn, and every hint names the command-line option."""

from __future__ import annotations

import warnings

import pytest
import torch

import formerkit as fk
from formerkit.data.labeled import load_labeled_jsonl
from formerkit.data.pairs import load_pairs
from formerkit.data.sources import resolve_source
from formerkit.train import TrainConfig

# ---- warmup ----------------------------------------------------------------------------------------------


def test_warmup_longer_than_the_run_warns():
    with pytest.warns(fk.FormerkitWarning, match=r"optim.warmup_steps=100 >= train.steps=50: the learning rate never "
                                                 r"reaches its peak optim.lr=0.001; set --optim.warmup_steps below"):
        TrainConfig.load(None, ["--train.steps", "50"])
    with pytest.warns(fk.FormerkitWarning, match=r"reaches its peak optim.lr=0.001 only at the last step"):
        TrainConfig.load(None, ["--train.steps", "40", "--optim.warmup_steps", "40"])


def test_warmup_shorter_than_the_run_is_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig.load(None, ["--train.steps", "50", "--optim.warmup_steps", "49"])


# ---- BPE vocabulary --------------------------------------------------------------------------------------


def test_a_bpe_vocabulary_much_smaller_than_asked_warns_with_its_real_size():
    with pytest.warns(fk.FormerkitWarning, match=r"learned \d+ tokens, far fewer than the 8192 asked "
                                                 r"\(--data.vocab_size, or vocab_size= in Python\)") as record:
        tokenizer = fk.train_bpe(["a small text, " * 10], 8192)
    assert f"the vocabulary size is {tokenizer.vocab_size}" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fk.train_bpe(["a small text, " * 10], 259).vocab_size == 259


# ---- prompt characters a char tokenizer does not know ----------------------------------------------------


def _char_model(tokenizer: fk.CharTokenizer) -> fk.Transformer:
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("gpt2", n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=32,
                                     vocab_size=tokenizer.vocab_size)
    return fk.Transformer(cfg).eval()


def test_unknown_prompt_characters_of_a_char_tokenizer_are_named():
    tokenizer = fk.CharTokenizer.from_texts(["abc d"])
    model = _char_model(tokenizer)
    assert tokenizer.unknown_chars("ab€éa€") == ["é", "€"]
    with pytest.warns(fk.FormerkitWarning, match="prompt characters unknown to the char tokenizer become <unk>: "
                                                 "'é', '€'"):
        fk.generate_text(model, tokenizer, "ab€é", max_new_tokens=2)
    with pytest.warns(fk.FormerkitWarning) as record:  # a batch: one warning naming all of them
        fk.generate_text(model, tokenizer, ["aé", "b€", "c"], max_new_tokens=2)
    assert [str(w.message).split(": ", 1)[1] for w in record] == ["'é', '€' (its training text had none of them)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.generate_text(model, tokenizer, "ab d", max_new_tokens=2)


# ---- hints name the command-line option ------------------------------------------------------------------


def test_a_missing_text_field_names_the_option(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(fk.DataError, match=r"--data.text_field, or text_field= in Python \(fields here: body\)"):
        list(resolve_source(str(path)).documents())


def test_a_missing_label_field_names_the_options(tmp_path):
    path = tmp_path / "labeled.jsonl"
    path.write_text('{"text": "x", "y": 1}\n')
    with pytest.raises(fk.DataError, match="--data.text_field / --data.label_field, or text_field= / label_field= "
                                           "in Python"):
        load_labeled_jsonl(path)


def test_a_missing_pair_key_names_both_spellings(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"en": "x", "target": "y"}\n')
    with pytest.raises(fk.DataError, match=r"--data.source_field \(source_field= in Python\)"):
        load_pairs(path)
