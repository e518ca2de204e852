"""The Python-likeness measures and the data-table rule of the default corpus."""

from __future__ import annotations

import inspect
import io
import json
import random
import sys
import textwrap
import tokenize

import pytest

from formerkit.data import python_code as pc
from formerkit.data.sources import stdlib_source

CODE = textwrap.dedent('''\
    import os


    def walk(root, suffix=".py"):
        """Yield the files under root."""
        for directory, _, files in os.walk(root):  # every level
            for name in files:
                if name.endswith(suffix):
                    yield os.path.join(directory, name)
    ''')


def test_token_kinds_of_a_known_snippet():
    counts = pc.token_kind_counts([CODE])
    # keywords: import def for in for in if yield; names: os | walk root suffix | directory _ files os walk root |
    # name files | name endswith suffix | os path join directory name
    assert counts["keyword"] == 8 and counts["name"] == 20
    assert counts["string"] == 2 and counts["comment"] == 1 and counts["number"] == 0
    # the snippet has no construct spanning lines, so reading it whole gives the same counts
    whole = [t for t in tokenize.generate_tokens(io.StringIO(CODE).readline)]
    assert counts["operator"] == sum(t.type == tokenize.OP for t in whole) == 21
    assert counts["name"] + counts["keyword"] == sum(t.type == tokenize.NAME for t in whole)
    mix = pc.token_kind_mix([CODE])
    assert sum(mix.values()) == pytest.approx(1.0) and set(mix) == set(pc.KINDS)
    assert pc.tokenizable_line_share([CODE]) == 1.0


def test_lines_that_do_not_tokenize_alone():
    # an unclosed bracket or triple-quoted string raises; a stray character is only an error token
    assert pc.tokenizable_line_share(["foo(a,", "x = 1", '"""a docstring starts', "    return x"]) == 0.5
    if sys.version_info < (3, 12):  # from 3.12 on, tokenize raises on a stray character too
        assert pc.tokenizable_line_share(["a $ b"]) == 1.0 and pc.token_kind_counts(["a $ b"])["error"] == 1
    assert pc.tokenizable_line_share(["", "   "]) == 0.0  # no line at all
    assert pc.token_kind_mix([""]) == {k: 0.0 for k in pc.KINDS}


def test_total_variation_closed_form():
    p = {"name": 0.5, "operator": 0.5}
    assert pc.total_variation(p, p) == 0
    assert pc.total_variation(p, {"number": 1.0}) == 1.0
    assert pc.total_variation(p, {"name": 0.25, "operator": 0.25, "number": 0.5}) == pytest.approx(0.5)


def test_real_code_is_close_to_the_corpus_and_noise_and_prose_are_far():
    code_texts = [inspect.getsource(m) for m in (json.decoder, json.encoder, random, textwrap)]
    corpus = pc.token_kind_mix(code_texts)
    pieces = [text[i: i + 600] for text in code_texts for i in range(0, len(text) - 600, 4000)][:8]
    assert pc.total_variation(pc.token_kind_mix(pieces), corpus) < 0.12
    noise = ["def 0 0x1f 0x20 0 0   0 0x7f\n  0 0 0 0x00, 0x01 0\n" * 10] * 8
    assert pc.total_variation(pc.token_kind_mix(noise), corpus) > 0.4
    prose = ["The quick brown fox jumps over the lazy dog and then it runs far away from here\n" * 10] * 8
    assert pc.total_variation(pc.token_kind_mix(prose), corpus) > 0.4


def table(rows: int) -> str:
    entries = "".join(f"    {hex(i)}: '\\x{i:02x}',  # {i}\n" for i in range(rows))
    return '"""A generated character map."""\n\nimport codecs\n\nTABLE = {\n' + entries + "}\n"


def test_data_table_rule():
    assert pc.is_data_table(table(60))
    assert not pc.is_data_table(table(10))  # too short to call
    assert not pc.is_data_table(CODE * 10)
    half = table(30) + "\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(30))
    assert not pc.is_data_table(half)
    comments = "\n".join(f"# line {i} of a long comment" for i in range(60))  # comments are not literals
    assert not pc.is_data_table(comments)


@pytest.mark.slow
def test_the_default_corpus_drops_the_generated_tables_and_keeps_the_code():
    source = stdlib_source()
    names = set(source.names)
    for table_file in ("encodings/cp1252.py", "encodings/mac_roman.py", "pydoc_data/topics.py", "html/entities.py"):
        assert table_file not in names
    for module in ("json/decoder.py", "os.py", "random.py", "encodings/utf_8.py", "locale.py", "opcode.py"):
        assert module in names
    assert source.skipped >= 60
    assert "data tables" in source.describe()
