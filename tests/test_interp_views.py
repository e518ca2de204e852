"""Pictures: the HTML attention view, PNG heat maps and the `formerkit inspect` report."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import pytest
import torch
from matplotlib.image import imread

import formerkit as fk
from formerkit.cli import main
from formerkit.errors import InputError
from formerkit.interp import run_with_cache
from formerkit.interp.plots import attention_png, logit_lens_png, patching_png
from formerkit.interp.report import inspect_report
from formerkit.interp.views import attention_html, patterns_from_cache
from formerkit.tokenizers import ByteTokenizer

EVIL = ["</script><script>alert(1)</script>", "<b>", "&amp;", "'\"", "\u2028", "x"]


class Scripts(HTMLParser):
    """Collects every element's tag and the text inside <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags, self.scripts, self._in = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in = tag == "script"
        if self._in:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.scripts[-1] += data


def decode(text: str, shape) -> torch.Tensor:
    """The page's bytes (255 x sqrt(p)) back to probabilities."""
    return (torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).view(*shape).float() / 255) ** 2


def page_data(page: str) -> tuple[dict, torch.Tensor, Scripts]:
    parsed = Scripts()
    parsed.feed(page)
    data = json.loads(parsed.scripts[0])
    return data, decode(data["weights"], data["shape"]), parsed


def random_patterns(L=2, H=3, T=6, S=6, seed=0) -> torch.Tensor:
    return torch.randn(L, H, T, S, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def test_page_carries_every_pattern_to_within_rounding():
    patterns = random_patterns(T=5, S=7)
    page = attention_html([f"q{i}" for i in range(5)], patterns, key_tokens=[f"k{i}" for i in range(7)],
                          layer_labels=["a", "b"])
    data, weights, parsed = page_data(page)
    assert data["shape"] == [2, 3, 5, 7] and data["layers"] == ["a", "b"] and data["keys"][6] == "k6"
    step = (patterns.sqrt() - weights.sqrt()).abs()
    assert step.max() <= 0.5 / 255 + 1e-6 and (weights - patterns).abs().max() < 1 / 255  # rounding, sqrt scale
    assert decode(data["thumbs"], [2, 3, *data["thumb_shape"]]).equal(weights)  # short: thumbnails = the patterns
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched: no CDN, no link
    assert parsed.tags.count("script") == 2 and parsed.tags.count("canvas") == 1


def test_long_inputs_keep_small_weights_and_get_block_max_thumbnails():
    patterns = torch.full((1, 1, 200, 200), 1 / 200)
    patterns[0, 0, 7, 130] = 0.5
    data, weights, _ = page_data(attention_html(["t"] * 200, patterns))
    assert (weights[0, 0, 0, 0] - 1 / 200).abs() < 1e-4  # not rounded away to 0
    thumbs = decode(data["thumbs"], [1, 1, *data["thumb_shape"]])[0, 0]
    assert data["thumb_shape"] == [64, 64] and thumbs.max() == weights.max()
    row, col = divmod(int(thumbs.argmax()), 64)
    assert row == 7 * 64 // 200 and col == 130 * 64 // 200  # the block holding the peak


def test_tokens_are_shown_never_run():
    page = attention_html(EVIL, random_patterns(T=len(EVIL), S=len(EVIL)), title="<i>title</i>")
    data, _, parsed = page_data(page)
    assert data["tokens"] == EVIL  # the tokens come back exactly as text
    assert parsed.tags.count("script") == 2 and "b" not in parsed.tags and "i" not in parsed.tags
    assert "alert(1)" not in parsed.scripts[1] and "<b>" not in page and "&lt;i&gt;title" in page
    assert "innerHTML" not in page  # the script writes tokens with textContent only


def test_page_refuses_mismatched_tokens_and_oversized_patterns():
    with pytest.raises(InputError, match="6 queries to 6 keys, but 5 query tokens and 5 key tokens"):
        attention_html(["a"] * 5, random_patterns())
    with pytest.raises(InputError, match="MB in the page"):
        attention_html(["a"] * 6, random_patterns(), max_mb=1e-5)
    with pytest.raises(InputError, match="one shape"):
        attention_html(["a"] * 6, [torch.rand(3, 6, 6), torch.rand(2, 6, 6)])


def test_patterns_from_cache_orders_layers_numerically():
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=12, d_model=16, n_heads=2, d_ff=32,
                                                      vocab_size=50, max_seq_len=16)).eval()
    _, cache = run_with_cache(model, torch.randint(0, 50, (2, 5)))
    stacked = patterns_from_cache(cache, batch=1)
    assert stacked.shape == (12, 2, 5, 5)
    for i in range(12):
        torch.testing.assert_close(stacked[i], cache["pattern", i][1])
    with pytest.raises(InputError, match="batch=2 is outside"):
        patterns_from_cache(cache, batch=2)
    with pytest.raises(InputError, match="cross_attn.hook_pattern"):
        patterns_from_cache(cache, cross=True)


def png_pixels(png: bytes):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(png))


def test_png_heat_maps(tmp_path):
    eye, flat = torch.eye(6), torch.full((6, 6), 1 / 6)
    a = png_pixels(attention_png(eye, list("abcdef"), path=tmp_path / "eye.png"))
    assert (tmp_path / "eye.png").read_bytes()[:4] == b"\x89PNG" and a.ndim == 3
    assert not (a.shape == png_pixels(attention_png(flat, list("abcdef"))).shape
                and (a == png_pixels(attention_png(flat, list("abcdef")))).all())
    png_pixels(logit_lens_png(torch.rand(3, 4), [["x"] * 4] * 3, layer_labels=["0_pre", "1_pre", "final_post"]))
    png_pixels(patching_png(torch.randn(2, 5), row_labels=["0", "1"], col_labels=list("abcde")))
    with pytest.raises(InputError, match="3 query tokens for a pattern with 6"):
        attention_png(eye, list("abc"))
    with pytest.raises(InputError, match="top tokens and layer labels"):
        logit_lens_png(torch.rand(3, 4), [["x"] * 4] * 2, layer_labels=["a", "b", "c"])


def small(preset: str = "gpt2", **extra) -> fk.Transformer:
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, n_layers=2, d_model=32, n_heads=4, d_ff=64,
                                                     vocab_size=259, max_seq_len=32, init_std=0.3, **extra)).eval()


def test_report_sections_hold_the_models_numbers():
    model, tok = small(), ByteTokenizer()
    page = inspect_report(model, tok, "abc<script>", corrupted="xyz<script>")
    ids = torch.tensor([tok.encode("abc<script>")])
    logits = model(ids).logits[0, -1]
    best = tok.decode([int(logits.argmax())], skip_special_tokens=False)
    for section in ("Next token", "Logit lens", "Heads writing towards", "Activation patching", "Attention"):
        assert f"<h2>{section}" in page
    assert f"{logits.softmax(-1).max().item():.3f}" in page and repr(best).replace("'", "&#x27;") in page
    assert "<script>" not in page.split("<iframe")[0]  # the prompt's "<script>" is escaped outside the view
    assert page.count("data:image/png;base64,") == 1 + 5 + 1  # lens, five heads, patching


def test_report_refusals_and_headless_models():
    model, tok = small(), ByteTokenizer()
    with pytest.raises(InputError, match="corrupted prompt has 2 tokens and the prompt 3"):
        inspect_report(model, tok, "abc", corrupted="ab")
    with pytest.raises(InputError, match="40 tokens but the model reads at most 32"):
        inspect_report(model, tok, "a" * 40)
    with pytest.raises(InputError, match="single-stack"):
        inspect_report(small("t5-small", n_decoder_layers=2), tok, "abc")
    page = inspect_report(small("bert-base", head="none"), tok, "abc")
    assert "no LM head" in page and "Logit lens" not in page and "<iframe" in page


def test_inspect_command_writes_the_report(tmp_path, capsys):
    fk.save_pretrained(small(), tmp_path / "ckpt", tokenizer=ByteTokenizer())
    assert main(["inspect", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def f(", "--out",
                 str(tmp_path / "r.html"), "--top-heads", "2"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == 1 + 2
    assert "wrote" in capsys.readouterr().out


def test_written_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from formerkit.interp.views import save_html

    mask = os.umask(0o022)
    os.umask(mask)
    path = save_html("<p>x</p>", tmp_path / "page.html")  # written through fileio.atomic_write
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # as open() would make it, not mkstemp's 0600
