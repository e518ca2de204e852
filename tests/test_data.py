"""Text sources, the token cache and split, window batches, and labeled JSONL."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import formerkit as fk
from formerkit.data import (
    LabeledData,
    WindowBatches,
    eval_batches,
    load_corpus,
    load_labeled_jsonl,
    resolve_source,
    validation_documents,
)
from formerkit.tokenizers import ByteTokenizer, CharTokenizer


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    """A directory of text files with hidden, cache and binary files mixed in."""
    root = tmp_path / "corpus"
    write(root / "b.txt", "second file\n")
    write(root / "a.py", "def a():\r\n    return 'é'\n")
    write(root / "sub" / "c.md", "# third\n")
    write(root / "sub" / "empty.txt", "")
    write(root / ".hidden.txt", "hidden\n")
    write(root / ".git" / "config", "hidden dir\n")
    write(root / "__pycache__" / "a.cpython-311.pyc", "cached\n")
    write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root / "latin1.txt", "caf\xe9".encode("latin-1"))
    return root


# ---- sources ---------------------------------------------------------------------------


def test_stdlib_is_the_default_corpus():
    source = resolve_source(None)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert source.kind == "stdlib" and len(source) > 100
    assert "json/__init__.py" in source.names
    assert source.names == sorted(source.names, key=lambda n: n.split("/"))
    assert not any("site-packages" in p.parts or "dist-packages" in p.parts for p in source.files)
    assert all(p.suffix == ".py" and stdlib in p.parents for p in source.files)
    assert resolve_source("stdlib").fingerprint() == source.fingerprint()
    assert f"{len(source):,} files" in source.describe()


def test_directory_source_skips_hidden_cache_and_binary_files(tree):
    source = resolve_source(str(tree))
    assert source.kind == "directory"
    assert source.names == ["a.py", "b.txt", "sub/c.md", "sub/empty.txt"]
    assert list(source.documents()) == ["def a():\r\n    return 'é'\n", "second file\n", "# third\n", ""]
    assert source.skipped == 2
    assert "4 files" in source.describe() and "2 skipped" in source.describe()


def test_file_source(tree):
    source = resolve_source(str(tree / "a.py"))
    assert source.kind == "file" and len(source) == 1
    assert list(source.documents()) == ["def a():\r\n    return 'é'\n"]  # newlines as stored


def test_glob_source(tree):
    source = resolve_source(str(tree / "**" / "*.txt"))
    assert source.kind == "glob"
    assert source.names == ["b.txt", "sub/empty.txt"]  # latin1.txt is not UTF-8: skipped
    assert source.skipped == 1
    with pytest.raises(fk.DataError, match="matches no files"):
        resolve_source(str(tree / "*.nothing"))


def test_jsonl_source(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 2}\n{"body": "x", "text": ""}\n')
    source = resolve_source(str(path))
    assert source.kind == "jsonl" and source.names == ["line 1", "line 3", "line 4"]
    assert list(source.documents()) == ["one", "two", ""]
    assert "3 records" in source.describe()
    other = resolve_source(str(path), text_field="body")
    assert other.fingerprint() != source.fingerprint()
    with pytest.raises(fk.DataError, match=r'line 1: no "body" field'):
        list(other.documents())


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "ok"}\n{"text": "a",}\n', r"line 2: invalid JSON"),
    ('{"text": "ok"}\n\n{"txt": "a"}\n', r'line 3: no "text" field.*text_field='),
    ('{"text": 5}\n', r'line 1: "text" must be a string, got int'),
    ('["text"]\n', r"line 1: expected a JSON object, got list"),
    ('{"text": ""}\n{"text": ""}\n', r"every record's \"text\" is empty"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(fk.DataError, match=message) as info:
        list(resolve_source(str(path)).documents())
    assert str(path) in str(info.value)


def test_invalid_utf8_in_jsonl_names_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(fk.DataError, match="line 2: not valid UTF-8"):
        list(resolve_source(str(path)).documents())


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bin.dat", b"abc\x00def", "looks binary"),
    ("latin.txt", "naïve".encode("latin-1"), "looks binary"),
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"  \n\n", "is empty"),
    ("empty.jsonl", b"\n", "is empty"),
])
def test_bad_explicit_files(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(fk.DataError, match=message):
        resolve_source(str(path))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(fk.DataError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.txt"))
    with pytest.raises(fk.DataError, match="empty string"):
        resolve_source(" ")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fk.DataError, match="holds no text files"):
        resolve_source(str(tmp_path / "empty"))
    write(tmp_path / "binary" / "x.bin", b"\x00\x01")
    with pytest.raises(fk.DataError, match=r"holds no text files \(1 skipped"):
        resolve_source(str(tmp_path / "binary"))
    write(tmp_path / "blank" / "x.txt", b"")
    with pytest.raises(fk.DataError, match="every file .* is empty"):
        resolve_source(str(tmp_path / "blank"))


def test_fingerprint_follows_the_files(tree):
    before = resolve_source(str(tree)).fingerprint()
    assert resolve_source(str(tree)).fingerprint() == before
    write(tree / "b.txt", "second file, edited\n")
    assert resolve_source(str(tree)).fingerprint() != before


# ---- token corpus ----------------------------------------------------------------------


def docs_dir(root: Path, count: int) -> Path:
    for i in range(count):
        write(root / f"doc{i:03d}.txt", f"document number {i}\n" * (1 + i % 3))
    return root


def expected_split(source, val_fraction: float, eos: int = 257) -> tuple[list[int], list[int]]:
    val = validation_documents(source.names, val_fraction)
    out: tuple[list[int], list[int]] = ([], [])
    for in_val, text in zip(val, source.documents(), strict=True):
        out[int(in_val)].extend([*text.encode(), eos])
    return out


def test_corpus_tokens_and_split_by_document(tmp_path):
    source = resolve_source(str(docs_dir(tmp_path / "docs", 40)))
    corpus = load_corpus(source, ByteTokenizer(), cache_dir=tmp_path / "cache", val_fraction=0.2)
    train, val = expected_split(source, 0.2)
    assert corpus.train.tolist() == train and corpus.val.tolist() == val
    assert corpus.train.dtype == corpus.val.dtype == np.uint16 and corpus.train.ndim == 1
    assert isinstance(corpus.train, np.memmap) and not corpus.train.flags.writeable
    assert corpus.num_tokens == source.num_bytes() + len(source) and corpus.vocab_size == 259
    in_val = validation_documents(source.names, 0.2)
    assert 0 < in_val.sum() < len(source)  # both splits hold documents, no document in both
    assert (validation_documents(source.names, 0.2) == in_val).all()


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_both_splits_are_non_empty(tmp_path, fraction):
    source = resolve_source(str(docs_dir(tmp_path / "docs", 2)))
    corpus = load_corpus(source, ByteTokenizer(), cache_dir=tmp_path / "cache", val_fraction=fraction)
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    assert sorted([corpus.train.tolist(), corpus.val.tolist()]) == sorted(expected_split(source, fraction))


def test_one_document_is_split_by_tokens(tmp_path):
    path = write(tmp_path / "one.txt", "x" * 199)
    corpus = load_corpus(resolve_source(str(path)), ByteTokenizer(), cache_dir=tmp_path / "cache",
                         val_fraction=0.1)
    assert len(corpus.val) == 20 and len(corpus.train) == 180
    assert corpus.train.tolist() + corpus.val.tolist() == [ord("x")] * 199 + [257]


def test_long_documents_are_tokenized_in_pieces(tmp_path, monkeypatch):
    import formerkit.data.tokens as tokens

    monkeypatch.setattr(tokens, "_PIECE_CHARS", 10)
    monkeypatch.setattr(tokens, "_CHUNK_CHARS", 25)
    text = "line one\nline two is longer than ten\nend" + "é" * 23
    path = write(tmp_path / "d" / "long.txt", text)
    write(tmp_path / "d" / "short.txt", "tiny")
    tok = CharTokenizer.from_texts([text, "tiny"])
    corpus = load_corpus(resolve_source(str(path.parent)), tok, cache_dir=tmp_path / "cache")
    tokens_all = sorted([corpus.train.tolist(), corpus.val.tolist()])
    assert tokens_all == sorted([tok.encode(text) + [tok.eos_id], tok.encode("tiny") + [tok.eos_id]])


def counting(tok):
    calls = []
    original = tok.encode_many
    tok.encode_many = lambda texts: calls.append(len(texts)) or original(texts)
    return calls


def test_cache_is_reused(tmp_path):
    source = resolve_source(str(docs_dir(tmp_path / "docs", 10)))
    tok = ByteTokenizer()
    calls = counting(tok)
    first = load_corpus(source, tok, cache_dir=tmp_path / "cache")
    assert calls and first.directory.parent == tmp_path / "cache"
    assert sorted(p.name for p in first.directory.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    stamps = [p.stat().st_mtime_ns for p in sorted(first.directory.iterdir())]
    calls.clear()
    second = load_corpus(resolve_source(str(tmp_path / "docs")), tok, cache_dir=tmp_path / "cache")
    assert calls == [] and second.directory == first.directory
    assert [p.stat().st_mtime_ns for p in sorted(first.directory.iterdir())] == stamps
    assert second.train.tolist() == first.train.tolist() and second.val.tolist() == first.val.tolist()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.directory.name]  # no temporary left
    meta = json.loads((first.directory / "meta.json").read_text())
    assert meta["train_tokens"] == len(first.train) and meta["documents"] == 10


def test_cache_key_follows_tokenizer_file_and_split(tmp_path):
    docs = docs_dir(tmp_path / "docs", 6)
    cache = tmp_path / "cache"
    source = resolve_source(str(docs))
    base = load_corpus(source, ByteTokenizer(), cache_dir=cache).directory
    char = load_corpus(source, CharTokenizer.from_texts(source.documents()), cache_dir=cache).directory
    other_split = load_corpus(source, ByteTokenizer(), cache_dir=cache, val_fraction=0.5).directory
    write(docs / "doc000.txt", "changed and longer\n")
    edited = load_corpus(resolve_source(str(docs)), ByteTokenizer(), cache_dir=cache).directory
    assert len({base, char, other_split, edited}) == 4


def test_failed_build_leaves_nothing_behind(tmp_path):
    source = resolve_source(str(docs_dir(tmp_path / "docs", 5)))
    tok = ByteTokenizer()

    def crash(texts):
        raise RuntimeError("killed mid-build")

    tok.encode_many = crash
    with pytest.raises(RuntimeError, match="killed"):
        load_corpus(source, tok, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    assert load_corpus(source, ByteTokenizer(), cache_dir=tmp_path / "cache").num_tokens > 0


@pytest.mark.parametrize("damage", ["no_meta", "short_file", "other_key"])
def test_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, damage):
    source = resolve_source(str(docs_dir(tmp_path / "docs", 8)))
    good = load_corpus(source, ByteTokenizer(), cache_dir=tmp_path / "cache")
    expected = good.train.tolist()
    entry = good.directory
    del good
    if damage == "no_meta":
        (entry / "meta.json").unlink()
    elif damage == "short_file":
        (entry / "train.bin").write_bytes((entry / "train.bin").read_bytes()[:-2])
    else:
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "key": "0" * 64}))
    again = load_corpus(source, ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert again.train.tolist() == expected


def test_jsonl_error_during_tokenization_leaves_no_cache(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "fine"}\n{"oops": 1}\n')
    with pytest.raises(fk.DataError, match="line 2"):
        load_corpus(resolve_source(str(path)), ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


class BigVocab:
    """A stub tokenizer with more than 65,536 ids and no eos."""

    vocab_size, eos_id = 70_000, None

    def encode_many(self, texts):
        return [[69_999, len(t)] for t in texts]

    def fingerprint(self):
        return "big"


def test_large_vocab_uses_uint32_and_no_eos_means_no_separator(tmp_path):
    source = resolve_source(str(docs_dir(tmp_path / "docs", 4)))
    corpus = load_corpus(source, BigVocab(), cache_dir=tmp_path / "cache")
    assert corpus.train.dtype == np.uint32 and corpus.num_tokens == 8
    assert 69_999 in corpus.train.tolist()


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.1"])
def test_bad_val_fraction(tmp_path, fraction):
    source = resolve_source(str(docs_dir(tmp_path / "docs", 2)))
    with pytest.raises(fk.ConfigError, match="val_fraction"):
        load_corpus(source, ByteTokenizer(), cache_dir=tmp_path / "cache", val_fraction=fraction)


@pytest.mark.slow
def test_stdlib_corpus_with_byte_tokenizer(tmp_path):
    source = resolve_source(None)
    corpus = load_corpus(source, ByteTokenizer(), cache_dir=tmp_path)
    assert corpus.num_tokens == sum(p.stat().st_size for p in source.files) + len(source)
    assert 0.02 < len(corpus.val) / corpus.num_tokens < 0.1


# ---- window batches --------------------------------------------------------------------


TOKENS = np.arange(5000, dtype=np.uint16)


def test_windows_are_shifted_slices():
    x, y = WindowBatches(TOKENS, batch_size=6, seq_len=32, seed=0).batch(0)
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # consecutive tokens: each window is a real slice
    assert torch.equal(x - x[:, :1], torch.arange(32).expand(6, 32))
    assert int(x.min()) >= 0 and int(y.max()) < len(TOKENS)


def test_batches_are_a_function_of_seed_and_step():
    a = WindowBatches(TOKENS, batch_size=8, seq_len=16, seed=1)
    b = WindowBatches(TOKENS, batch_size=8, seq_len=16, seed=1)
    assert torch.equal(a.batch(7)[0], b.batch(7)[0])
    assert torch.equal(a.batch(7)[0], a.batch(7)[0])  # no hidden state: resume at any step
    assert not torch.equal(a.batch(7)[0], a.batch(8)[0])
    assert not torch.equal(a.batch(7)[0], WindowBatches(TOKENS, batch_size=8, seq_len=16, seed=2).batch(7)[0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_make_up_the_single_process_batch(world_size):
    whole_x, whole_y = WindowBatches(TOKENS, batch_size=8, seq_len=16, seed=3).batch(11)
    parts = [WindowBatches(TOKENS, batch_size=8, seq_len=16, seed=3, rank=r, world_size=world_size).batch(11)
             for r in range(world_size)]
    assert all(x.shape == (8 // world_size, 16) for x, _ in parts)
    assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
    assert torch.equal(torch.cat([y for _, y in parts]), whole_y)


def test_shortest_possible_split():
    x, y = WindowBatches(np.arange(9, dtype=np.uint16), batch_size=3, seq_len=8, seed=0).batch(0)
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3


def test_window_errors():
    with pytest.raises(fk.DataError, match=r"has 8 tokens, but seq_len=8 needs at least 9"):
        WindowBatches(np.arange(8), batch_size=2, seq_len=8, seed=0)
    with pytest.raises(fk.ConfigError, match="divisible by world_size=3"):
        WindowBatches(TOKENS, batch_size=8, seq_len=8, seed=0, world_size=3)
    with pytest.raises(fk.ConfigError, match="rank must be below"):
        WindowBatches(TOKENS, batch_size=8, seq_len=8, seed=0, rank=2, world_size=2)
    with pytest.raises(fk.ConfigError, match="seq_len"):
        WindowBatches(TOKENS, batch_size=8, seq_len=0, seed=0)
    with pytest.raises(fk.ConfigError, match="step"):
        WindowBatches(TOKENS, batch_size=8, seq_len=8, seed=0).batch(-1)
    with pytest.raises(fk.ConfigError, match="seed must be an integer, got 1.5"):
        WindowBatches(TOKENS, batch_size=8, seq_len=8, seed=1.5)
    with pytest.raises(fk.DataError, match="1-D"):
        WindowBatches(TOKENS.reshape(50, 100), batch_size=8, seq_len=8, seed=0)


def test_eval_batches_cover_the_split_evenly():
    batches = eval_batches(TOKENS, batch_size=4, seq_len=10, max_batches=3)
    again = eval_batches(TOKENS, batch_size=4, seq_len=10, max_batches=3)
    assert len(batches) == 3 and all(x.shape == y.shape == (4, 10) for x, y in batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts[0] == 0 and starts[-1] == len(TOKENS) - 11  # from the start to the very end
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1
    assert all(torch.equal(y, x + 1) for x, y in batches)


def test_eval_batches_on_a_small_split():
    batches = eval_batches(np.arange(35, dtype=np.uint16), batch_size=2, seq_len=10, max_batches=5)
    starts = [row[0] for x, _ in batches for row in x.tolist()]
    assert [x.shape[0] for x, _ in batches] == [2, 1]  # three windows fit; the last batch is smaller
    assert starts == [0, 12, 24]
    with pytest.raises(fk.DataError, match="needs at least 11"):
        eval_batches(np.arange(10), batch_size=2, seq_len=10, max_batches=1)


# ---- labeled JSONL ---------------------------------------------------------------------


def test_string_labels_map_to_sorted_ids(tmp_path):
    path = write(tmp_path / "l.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n'
                                       '{"text": "fine", "label": "pos", "extra": 1}\n')
    data = load_labeled_jsonl(path)
    assert data == LabeledData(["good", "bad", "fine"], [1, 0, 1], ["neg", "pos"])


def test_int_labels_and_custom_fields(tmp_path):
    path = write(tmp_path / "l.jsonl", '{"s": "a", "y": 2}\n{"s": "b", "y": 0}\n')
    data = load_labeled_jsonl(path, text_field="s", label_field="y")
    assert data.labels == [2, 0] and data.label_names == ["0", "1", "2"]


def test_labeled_split_is_deterministic_and_disjoint(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(50)]
    data = load_labeled_jsonl(write(tmp_path / "l.jsonl", "\n".join(lines)))
    train, val = data.split(0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train.texts + val.texts) == sorted(data.texts) and not set(train.texts) & set(val.texts)
    assert all(data.labels[data.texts.index(t)] == y for t, y in zip(train.texts, train.labels, strict=True))
    again = data.split(0.2, seed=0)
    assert again[1].texts == val.texts and data.split(0.2, seed=1)[1].texts != val.texts
    assert data.split(0.2, seed=-1)[1].texts != val.texts
    assert train.label_names == data.label_names
    two = LabeledData(["a", "b"], [0, 1], ["0", "1"]).split(0.01, seed=0)
    assert (len(two[0]), len(two[1])) == (1, 1)
    with pytest.raises(fk.ConfigError, match="val_fraction"):
        data.split(1.0, seed=0)


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "a", "label": 1}\n{"text": "b" "label": 1}\n', "line 2: invalid JSON"),
    ('{"text": "a", "label": 1}\n{"text": "b"}\n', 'line 2: no "label" field'),
    ('{"label": 1}\n', 'line 1: no "text" field'),
    ('{"text": ["a"], "label": 1}\n', 'line 1: "text" must be a string'),
    ('{"text": "a", "label": 1.5}\n', 'line 1: "label" must be a string or a non-negative integer, got float'),
    ('{"text": "a", "label": true}\n', "got bool"),
    ('{"text": "a", "label": null}\n', "got NoneType"),
    ('{"text": "a", "label": -1}\n', "line 1: .*must be >= 0"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 1}\n', "line 2: .*one kind of label"),
    ("\n\n", "holds no records"),
    ("", "holds no records"),
])
def test_labeled_errors_name_the_line(tmp_path, content, message):
    path = write(tmp_path / "l.jsonl", content)
    with pytest.raises(fk.DataError, match=message):
        load_labeled_jsonl(path)


def test_labeled_missing_file(tmp_path):
    with pytest.raises(fk.DataError, match="does not exist"):
        load_labeled_jsonl(tmp_path / "nope.jsonl")


def test_unreadable_source_file_is_reported(tmp_path):
    path = write(tmp_path / "d" / "a.txt", "text")
    source = resolve_source(str(path.parent))
    os.remove(path)
    with pytest.raises(fk.DataError, match="changed after the source was resolved"):
        list(source.documents())
    with pytest.raises(fk.DataError, match="a.txt .*resolve the source again"):
        source.fingerprint()
