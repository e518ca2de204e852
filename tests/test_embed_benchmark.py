"""Smoke test of benchmarks/embed_throughput.py on a handful of sentences, so it cannot rot."""

from __future__ import annotations

from conftest import load_script, require

require("sentence_transformers")


def test_tiny_run_compares_both_libraries(capsys):
    bench = load_script("benchmarks/embed_throughput.py")
    texts = bench.stdlib_sentences(12)
    assert texts == bench.stdlib_sentences(12)  # deterministic
    assert len(set(texts)) == 12 and min(map(len, texts)) < 100 < 500 < max(map(len, texts))  # short and long
    out = bench.main(["--sentences", "12", "--repeats", "1", "--sweep", "64"])
    text = capsys.readouterr().out
    assert "CPU:" in text and "speed ratio" in text and "max_tokens=64" in text
    assert out["sentences"] == 12 and out["cpu"] in text
    assert set(out["rates"]) == {"formerkit", "sentence-transformers", "formerkit max_tokens=64"}
    assert all(rate > 0 for rate in out["rates"].values())
    assert out["ratio"] == out["rates"]["formerkit"] / out["rates"]["sentence-transformers"]
    assert out["cosine_min"] >= 0.99999 and out["cosine_mean"] >= out["cosine_min"]
