"""fk.embed's token-count batching: the batches it plans, and results independent of them.

The real all-MiniLM-L6-v2 checkpoint embeds a few dozen mixed-length texts (the benchmark's
stdlib sentences plus texts of equal length, which run without an attention mask) and is
compared with sentence-transformers and with one-text-at-a-time embedding; tiny random
models check that an unused LM head is skipped and that encoder-decoders embed their encoder.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import formerkit as fk
from conftest import load_script, require
from formerkit.embed import MIN_FILL, plan_batches
from formerkit.heads import pool

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
require("sentence_transformers")

bench = load_script("benchmarks/embed_throughput.py")
MODEL_DIR = bench.MODEL_DIR
TEXTS = bench.stdlib_sentences(14) + ["same length one", "same length two", "same length one", "", "x"]


@pytest.fixture(scope="module")
def minilm():
    return fk.from_pretrained(MODEL_DIR), fk.load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def one_by_one(minilm) -> torch.Tensor:
    model, tok = minilm
    return torch.stack([fk.embed(model, tok, text) for text in TEXTS])


@pytest.fixture(scope="module")
def default(minilm) -> torch.Tensor:
    return fk.embed(*minilm, TEXTS)


# ---- the batch plan ------------------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "batch_size"), [(1, None), (50, None), (300, None), (300, 3), (10**6, None)])
def test_plan_covers_every_text_once_within_the_budget(max_tokens, batch_size):
    lengths = [random.Random(i).randint(1, 120) for i in range(200)]
    batches = plan_batches(lengths, max_tokens, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * width <= max_tokens
        assert batch_size is None or len(batch) <= batch_size
        assert min(lengths[i] for i in batch) >= MIN_FILL * width  # little padding in any batch
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)  # longest first: similar lengths share a batch
    # greedy: adding the next text to any batch would have broken a limit
    for batch, after in zip(batches[:-1], batches[1:], strict=True):
        full = batch_size is not None and len(batch) == batch_size
        width, next_length = max(lengths[i] for i in batch), lengths[after[0]]
        assert full or (len(batch) + 1) * width > max_tokens or next_length < MIN_FILL * width


def test_plan_of_nothing_is_empty():
    assert plan_batches([], 100) == []


# ---- results do not depend on batching ----------------------------------------------


def test_equal_length_texts_really_share_an_unmasked_batch(minilm):
    _, tok = minilm
    lengths = tok.batch(TEXTS[-5:-2])[1].sum(1).tolist()
    assert len(set(lengths)) == 1


@pytest.mark.parametrize(("max_tokens", "batch_size"), [(64, None), (600, None), (None, 4)])
def test_batching_equals_one_by_one(minilm, one_by_one, max_tokens, batch_size):
    out = fk.embed(*minilm, TEXTS, max_tokens=max_tokens, batch_size=batch_size)
    assert out.shape == one_by_one.shape
    assert (out - one_by_one).abs().max().item() < 1e-5


def test_default_batching_equals_one_by_one(default, one_by_one):
    assert (default - one_by_one).abs().max().item() < 1e-5


def test_order_does_not_matter(minilm, default):
    perm = list(range(len(TEXTS)))
    random.Random(1).shuffle(perm)
    shuffled = fk.embed(*minilm, [TEXTS[i] for i in perm], max_tokens=500)
    assert (shuffled - default[perm]).abs().max().item() < 1e-5
    assert (shuffled - default).abs().max().item() > 0.1  # the rows did move


def test_matches_sentence_transformers(default):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MODEL_DIR), device="cpu")
    reference = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True).float().cpu()
    cosine = F.cosine_similarity(default, reference, dim=-1)
    assert cosine.min().item() >= 0.99999
    assert (default - reference).abs().max().item() < 1e-4


def test_texts_past_one_chunk_keep_their_rows(minilm, one_by_one, monkeypatch):
    monkeypatch.setattr(sys.modules["formerkit.embed"], "CHUNK", 7)  # three chunks, the last one short
    out = fk.embed(*minilm, TEXTS, max_tokens=256)
    assert (out - one_by_one).abs().max().item() < 1e-5


# ---- what runs: no LM head; the encoder of an encoder-decoder ----------------------------


def _tiny(preset: str) -> fk.Transformer:
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset(preset, d_model=32, n_heads=4, d_ff=64, n_layers=2, vocab_size=259,
                                     **({"n_decoder_layers": 2} if preset.startswith("t5") else {}))
    return fk.Transformer(cfg).eval()


def test_lm_head_is_not_run_and_the_hidden_states_are_pooled():
    model, tok = _tiny("bert-base"), fk.ByteTokenizer()
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    texts = ["a short one", "a somewhat longer text than that", ""]
    out = fk.embed(model, tok, texts, normalize=False, pooling="mean")
    assert not calls
    ids, mask = tok.batch(texts)
    with torch.no_grad():
        expected = pool(model(ids, mask).hidden_states, mask, "mean")
    assert calls  # the full forward does run the head
    assert (out - expected).abs().max().item() < 1e-5
    assert (out[2] == 0).all()  # no tokens: zeros, as pool gives


def test_encoder_decoder_embeds_its_encoder_output():
    model, tok = _tiny("t5-small"), fk.ByteTokenizer()
    texts = ["translate this", "and this longer one too"]
    out = fk.embed(model, tok, texts, pooling="mean")
    ids, mask = tok.batch(texts)
    with torch.no_grad():
        expected = F.normalize(pool(model.encode(ids, mask), mask, "mean"), dim=-1)
    assert (out - expected).abs().max().item() < 1e-5


# ---- bad options ----------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [0, -3, 2.5, True])
def test_bad_max_tokens_is_an_input_error(minilm, max_tokens):
    with pytest.raises(fk.InputError, match="max_tokens"):
        fk.embed(*minilm, ["fine"], max_tokens=max_tokens)


def test_cli_max_tokens_option(minilm, one_by_one, capsys):
    from formerkit.cli import main

    texts = TEXTS[1:6]
    assert main(["embed", "--checkpoint", str(MODEL_DIR), "--max-tokens", "40", "--json", *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    vectors = torch.tensor([r["embedding"] for r in rows])
    assert (vectors - one_by_one[1:6]).abs().max().item() < 1e-5
    assert main(["embed", "--checkpoint", str(MODEL_DIR), "--max-tokens", "0", "x"]) == 2
    assert "max_tokens" in capsys.readouterr().err
