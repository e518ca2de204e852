"""Fuzzing the tokenizers with random text, bytes, ids and lengths: byte and byte-level BPE tokenizers give back
exactly the text they encoded, the char tokenizer does for text of its own characters, and nothing raises but
formerkit's own errors (FormerkitError)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

import formerkit as fk

FUZZ = settings(max_examples=150, deadline=None)
CORPUS = ["def main(x):\n    return x * 2  # héllo wörld €\n", "Ünïcödé ∑ 日本語 🙂 text\ttabs and spaces  "]
ANY_TEXT = st.text(max_size=40) | st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["", " ", "\n"])
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, fk.Tokenizer]:
    """One tokenizer of each kind: byte, char (of CORPUS), byte-level BPE trained on CORPUS, the same BPE and a
    word-level tokenizer read back from tokenizer.json files."""
    directory = tmp_path_factory.mktemp("tokenizers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fk.FormerkitWarning)  # the tiny corpus learns fewer tokens than asked
        bpe = fk.train_bpe(CORPUS * 5, 300)
    (directory / "bpe").mkdir()
    bpe.save(directory / "bpe")
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    (directory / "words").mkdir()
    words.save(str(directory / "words" / "tokenizer.json"))
    (directory / "words" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    return {"byte": fk.ByteTokenizer(), "char": fk.CharTokenizer.from_texts(CORPUS), "bpe": bpe,
            "bpe-file": fk.load_tokenizer(directory / "bpe"),
            "words-file": fk.load_tokenizer(directory / "words")}


def _without_specials(tokenizer: fk.Tokenizer, text: str) -> bool:
    """True when ``text`` spells none of the tokenizer's special tokens (those encode to their own ids)."""
    return not any(token in text for token in tokenizer.special_tokens.values())


@FUZZ
@given(ANY_TEXT)
def test_byte_and_bpe_tokenizers_round_trip_any_text(toks, text):
    for name in ("byte", "bpe", "bpe-file"):
        tokenizer = toks[name]
        if _without_specials(tokenizer, text):
            ids = tokenizer.encode(text)
            assert all(0 <= i < tokenizer.vocab_size for i in ids)
            assert tokenizer.decode(ids) == text, name
            assert tokenizer.encode_many([text, text]) == [ids, ids]
    assert toks["bpe"].encode(text) == toks["bpe-file"].encode(text)  # saved and read back: the same tokenizer


@FUZZ
@given(st.binary(max_size=40))
def test_byte_tokenizer_decodes_any_bytes(toks, data):
    text = toks["byte"].decode(list(data))
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert "\ufffd" in text  # invalid UTF-8 becomes U+FFFD
    else:
        assert toks["byte"].encode(text) == list(data)


@FUZZ
@given(st.text(st.sampled_from(sorted(set("".join(CORPUS)))), max_size=40))
def test_char_tokenizer_round_trips_text_of_its_characters(toks, text):
    char = toks["char"]
    ids = char.encode(text)
    assert len(ids) == len(text) and char.decode(ids) == text and char.unknown_chars(text) == []


@FUZZ
@given(ANY_TEXT | SURROGATES, st.none() | st.integers(-2, 12) | st.sampled_from([2.5, True]), st.booleans())
def test_any_text_encodes_or_raises_formerkit_errors(toks, text, max_length, add_special_tokens):
    for name, tokenizer in toks.items():
        try:
            ids = tokenizer.encode(text, max_length=max_length, add_special_tokens=add_special_tokens)
        except fk.FormerkitError:
            continue
        assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids), name
        assert max_length is None or len(ids) <= max_length
        assert isinstance(tokenizer.decode(ids, skip_special_tokens=False), str)
        if name == "char":  # one id per character, <unk> (3) for those it does not know
            unknown = set(tokenizer.unknown_chars(text))
            assert [i == 3 for i in tokenizer.encode(text)] == [c in unknown for c in text]


@FUZZ
@given(st.lists(st.integers(-3, 400) | st.just(2**40) | st.just(1.5), max_size=10), st.booleans(), st.booleans())
def test_any_ids_decode_or_raise_formerkit_errors(toks, ids, as_tensor, skip_special_tokens):
    if as_tensor and all(isinstance(i, int) and abs(i) < 2**40 for i in ids):
        ids = torch.tensor(ids, dtype=torch.long)
    for tokenizer in toks.values():
        try:
            text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        except fk.FormerkitError:
            continue
        assert isinstance(text, str)


@FUZZ
@given(st.lists(ANY_TEXT | SURROGATES, max_size=3) | st.text(max_size=3) | st.just([1, 2]),
       st.none() | st.integers(-1, 8) | st.sampled_from(["8", True]))
def test_any_batch_pads_or_raises_formerkit_errors(toks, texts, max_length):
    for name, tokenizer in toks.items():
        try:
            ids, mask = tokenizer.batch(texts, max_length=max_length)
        except fk.FormerkitError:
            continue
        assert ids.shape == mask.shape and ids.shape[0] == len(texts), name
        assert bool(((mask == 0) | (mask == 1)).all()) and bool((ids[mask == 0] == tokenizer.pad_id).all())
        assert max_length is None or ids.shape[1] <= max_length


@pytest.mark.parametrize("name", ["bpe", "bpe-file", "words-file"])
def test_tokenizer_json_errors_found_by_fuzzing(toks, name):
    """The Rust library raised TypeError for a lone surrogate and OverflowError for a negative id."""
    tokenizer = toks[name]
    with pytest.raises(fk.InputError, match="not valid Unicode"):
        tokenizer.encode("a\ud800b")
    with pytest.raises(fk.InputError, match="text 1 is not valid Unicode"):
        tokenizer.batch(["fine", "\udfff"])
    with pytest.raises(fk.InputError, match="token id -1 is negative"):
        tokenizer.decode([2, -1])
    with pytest.raises(fk.InputError, match="integer ids"):
        tokenizer.decode([1.5])
    assert tokenizer.decode([2, 10**6, 2**40]) == tokenizer.decode([2])  # ids it does not have decode to nothing
