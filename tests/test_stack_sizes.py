"""Per-stack sizes: an encoder-decoder whose decoder has its own head count, k/v heads and feed-forward width.

BART configs may give the decoder other sizes than the encoder (``decoder_attention_heads``,
``decoder_ffn_dim``). A transformers ``BartForConditionalGeneration`` with both different,
re-initialised at std 0.3, is loaded by formerkit: logits within ``PARITY_TOL``, greedy ids equal
to transformers' ``generate``. Mutant checks: a decoder built with the encoder's ``d_ff`` is refused
naming the mis-shaped tensors, one with the encoder's head count fails the parity check. formerkit
-> HF dir -> transformers gives the same logits; cached decoding with the decoder's own (grouped)
heads equals recomputation; the config fields are validated and kept out of T5.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import formerkit as fk
from conftest import PARITY_TOL, parity_error, reinit_for_parity, require
from formerkit.cache import KVCache
from formerkit.presets import PRESETS
from formerkit.train.init_from import init_model_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = require("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96
# encoder: 4 heads of 8, d_ff 48; decoder: 8 heads of 4, d_ff 64
SIZES = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=8,
             encoder_ffn_dim=48, decoder_ffn_dim=64)


def _bart() -> transformers.BartForConditionalGeneration:
    cfg = transformers.BartConfig(vocab_size=VOCAB, max_position_embeddings=40, forced_eos_token_id=None, **SIZES)
    model = reinit_for_parity(transformers.BartForConditionalGeneration(cfg))
    model.final_logits_bias.normal_(0.0, 0.5)  # zeros at init: make it matter
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers model, the directory it was saved to with save_pretrained)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bart-uneven")
    hf = _bart()
    hf.save_pretrained(path)
    return hf, path


def _batch(seed: int = 0):
    """Sources (3, 11) right-padded to 11/7/4 tokens and decoder inputs (3, 9) with one padded row."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(3, VOCAB, (3, 11), generator=g), torch.randint(3, VOCAB, (3, 9), generator=g)
    src_mask, tgt_mask = torch.ones_like(src), torch.ones_like(tgt)
    src_mask[1, 7:] = src_mask[2, 4:] = 0
    tgt_mask[1, 6:] = 0
    return src, src_mask, tgt, tgt_mask


def _logits(model, src, src_mask, tgt, tgt_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, vocab), encoder output (B, S, d_model)) of a formerkit or transformers model."""
    with torch.no_grad():
        out = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    if isinstance(out, fk.ModelOutput):
        return out.logits, out.encoder_hidden_states
    return out.logits, out.encoder_last_hidden_state


def _errors(ours, hf, batch) -> tuple[float, float]:
    """parity_error of formerkit's encoder output and logits against transformers', at real tokens."""
    (logits, encoder), (expected, expected_encoder) = _logits(ours, *batch), _logits(hf, *batch)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zeros
    return (parity_error(encoder, expected_encoder, batch[1].bool()),
            parity_error(logits, expected, batch[3].bool()))


# ---------------------------------------------------------------- transformers' BART with uneven stacks


def test_config_reads_the_decoder_sizes(saved):
    cfg = fk.from_pretrained(saved[1]).config
    assert (cfg.n_heads, cfg.d_ff, cfg.decoder_n_heads, cfg.decoder_d_ff) == (4, 48, 8, 64)
    assert (cfg.decoder_heads, cfg.decoder_kv_heads, cfg.decoder_head_dim, cfg.decoder_ff) == (8, 8, 4, 64)


def test_load_matches_transformers(saved):
    hf, path = saved
    ours = fk.from_pretrained(path)
    block = ours.decoder.blocks[0]
    assert (block.attn.n_heads, block.cross_attn.n_heads, block.mlp.fc_in.out_features) == (8, 8, 64)
    assert (ours.encoder.blocks[0].attn.n_heads, ours.encoder.blocks[0].mlp.fc_in.out_features) == (4, 48)
    assert max(_errors(ours, hf, _batch())) < PARITY_TOL


def test_a_decoder_with_the_encoders_d_ff_is_refused(saved, monkeypatch):
    """Mutant: a decoder built with the encoder's d_ff no longer fits the checkpoint; the error names the tensors."""
    decoder_config = fk.ModelConfig.decoder_config
    monkeypatch.setattr(fk.ModelConfig, "decoder_config",
                        lambda self: dataclasses.replace(decoder_config(self), d_ff=self.d_ff))
    with pytest.raises(fk.CheckpointError, match="wrong shapes") as info:
        fk.from_pretrained(saved[1])
    assert "decoder.layers.0.fc1.weight: checkpoint (64, 32), model (48, 32)" in str(info.value)
    assert "decoder.layers.1.fc2.weight: checkpoint (32, 64), model (32, 48)" in str(info.value)
    assert "encoder.layers" not in str(info.value)


def test_a_decoder_with_the_encoders_heads_fails_the_parity_check(saved, monkeypatch):
    """Mutant: the same weights split into the encoder's 4 heads load (the shapes agree) but give other logits."""
    decoder_config = fk.ModelConfig.decoder_config
    monkeypatch.setattr(fk.ModelConfig, "decoder_config",
                        lambda self: dataclasses.replace(decoder_config(self), n_heads=self.n_heads))
    hf, path = saved
    encoder, logits = _errors(fk.from_pretrained(path), hf, _batch())
    assert encoder < PARITY_TOL and logits > 100 * PARITY_TOL


def test_greedy_generate_equals_transformers(saved):
    hf, path = saved
    ours = fk.from_pretrained(path)
    src = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    first = fk.generate(ours, src, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    eos = [int(first[0, 3])]  # the first source ends after three tokens
    with torch.no_grad():
        expected = hf.generate(src, attention_mask=mask, do_sample=False, num_beams=1, eos_token_id=eos,
                               pad_token_id=hf.config.pad_token_id, max_new_tokens=8)
    got = fk.generate(ours, src, attention_mask=mask, max_new_tokens=8, eos_token_id=eos,
                      pad_token_id=hf.config.pad_token_id)
    assert eos[0] in got[0, 1:4].tolist() and got.shape[1] > 4  # row 0 stopped early, row 1 went on
    assert torch.equal(got, expected)


def test_round_trip_through_hf_dir(saved, tmp_path):
    hf, path = saved
    ours = fk.from_pretrained(path)
    fk.save_pretrained(ours, tmp_path, format="hf")
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in SIZES} == SIZES
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = _batch(seed=1)
    assert parity_error(_logits(reloaded, *batch)[0], _logits(hf, *batch)[0], batch[3].bool()) < PARITY_TOL
    assert fk.from_pretrained(tmp_path).config == ours.config


def test_a_formerkit_model_written_as_hf_gives_transformers_the_same_logits(tmp_path):
    """A model that starts in formerkit (decoder: 2 heads of 16, d_ff 24) -> HF dir -> transformers."""
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("bart-base", vocab_size=VOCAB, d_model=32, n_layers=2, n_decoder_layers=1,
                                     n_heads=4, d_ff=48, decoder_n_heads=2, decoder_d_ff=24, max_seq_len=40,
                                     init_std=0.3, resid_dropout=0.0, embed_dropout=0.0)
    ours = fk.Transformer(cfg).eval()
    fk.save_pretrained(ours, tmp_path, format="hf")
    hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (hf.config.decoder_attention_heads, hf.config.decoder_ffn_dim) == (2, 24)
    assert max(_errors(ours, hf, _batch(seed=2))) < PARITY_TOL


# ---------------------------------------------------------------- the KV cache of a decoder with its own heads


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "relative"])
def test_cached_decoding_equals_recomputation(position):
    """Decoder: 8 query heads sharing 2 k/v heads of 4 (encoder: 4 heads of 8); prefill 3 tokens, then one at a time."""
    torch.manual_seed(0)
    cfg = fk.ModelConfig(kind="encoder-decoder", vocab_size=VOCAB, d_model=32, n_layers=2, n_decoder_layers=2,
                         n_heads=4, d_ff=48, decoder_n_heads=8, decoder_n_kv_heads=2, decoder_d_ff=40,
                         position=position, relative_buckets=8, relative_max_distance=16, max_seq_len=32,
                         init_std=0.2)
    model = fk.Transformer(cfg).eval()
    if position in ("alibi", "relative"):  # the per-head position tables follow each stack's heads
        sizes = {"alibi": lambda s: s.alibi_slopes.shape[0], "relative": lambda s: s.pos_bias.weight.shape[1]}
        assert (sizes[position](model.encoder), sizes[position](model.decoder)) == (4, 8)
    src, src_mask, tgt, _ = _batch(seed=4)
    with torch.no_grad():
        full = model(src, src_mask, decoder_input_ids=tgt).logits  # (B, T, V)
        cache = KVCache.for_model(model, src.shape[0], tgt.shape[1])
        assert cache.layers[0].k.shape == (3, 2, tgt.shape[1], 4)  # (B, decoder k/v heads, L, decoder head size)
        pieces = [model(src, src_mask, decoder_input_ids=tgt[:, :3], cache=cache).logits]
        pieces += [model(None, decoder_input_ids=tgt[:, t:t + 1], cache=cache).logits for t in range(3, tgt.shape[1])]
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-4


# ---------------------------------------------------------------- config


def _s2s(**kw) -> fk.ModelConfig:
    return fk.ModelConfig(**{**dict(kind="encoder-decoder", vocab_size=64, d_model=32, n_heads=4, d_ff=48,
                                    n_layers=1), **kw})


def test_decoder_sizes_default_to_the_encoders():
    cfg = _s2s(n_kv_heads=2)
    assert (cfg.decoder_heads, cfg.decoder_kv_heads, cfg.decoder_head_dim, cfg.decoder_ff) == (4, 2, 8, 48)
    assert cfg.decoder_config() is cfg
    assert _s2s(decoder_n_heads=8).decoder_kv_heads == 8  # no n_kv_heads: plain multi-head attention
    assert _s2s(n_kv_heads=2, decoder_n_heads=8).decoder_kv_heads == 2
    assert _s2s(decoder_n_heads=8, d_head=6).decoder_head_dim == 6


def test_decoder_config_carries_the_decoder_sizes():
    cfg = _s2s(n_kv_heads=2, decoder_n_heads=8, decoder_n_kv_heads=4, decoder_d_ff=24)
    side = cfg.decoder_config()
    assert (side.n_heads, side.kv_heads, side.head_dim, side.d_ff) == (8, 4, 4, 24)
    assert (side.decoder_n_heads, side.decoder_n_kv_heads, side.decoder_d_ff) == (None, None, None)
    assert side.replace(n_heads=4, n_kv_heads=2, d_ff=48) == cfg.replace(decoder_n_heads=None, decoder_n_kv_heads=None,
                                                                         decoder_d_ff=None)
    assert fk.ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kw, fragment", [
    (dict(kind="decoder", head="lm", decoder_n_heads=2),
     r"decoder_n_heads sizes the decoder of an encoder-decoder model, got kind='decoder'; set it to null \(n_heads"),
    (dict(kind="encoder", head="none", decoder_d_ff=8), r"decoder_d_ff sizes the decoder .* \(d_ff sizes the one"),
    (dict(kind="decoder", decoder_n_kv_heads=1), "decoder_n_kv_heads sizes the decoder"),
    (dict(decoder_n_heads=6), r"d_model=32 is not divisible by decoder_n_heads=6; .* set d_head"),
    (dict(n_kv_heads=2, decoder_n_heads=1), r"decoder's 1 heads .* not a multiple of its 2 key/value heads"),
    (dict(decoder_n_heads=8, decoder_n_kv_heads=3), "set decoder_n_kv_heads to a divisor of 8"),
    (dict(d_model=24, decoder_n_heads=8, position="rope"), r"RoPE rotates 3 of the decoder's 3 dims per head"),
    (dict(decoder_d_ff=0), r"decoder_d_ff must be a positive integer or null, got 0"),
    (dict(decoder_n_heads=True), r"decoder_n_heads must be a positive integer or null, got True"),
])
def test_validation(kw, fragment):
    with pytest.raises(fk.ConfigError, match=fragment):
        _s2s(**kw)


def test_a_given_d_head_frees_the_decoder_heads_from_d_model():
    cfg = _s2s(decoder_n_heads=6, d_head=8)
    assert fk.Transformer(cfg).decoder.blocks[0].attn.qkv.out_features == 3 * 6 * 8


def test_overriding_d_model_scales_a_presets_decoder_d_ff(monkeypatch):
    monkeypatch.setitem(PRESETS, "uneven-bart", {**PRESETS["bart-base"], "decoder_d_ff": 1536})
    cfg = fk.ModelConfig.from_preset("uneven-bart", d_model=384)
    assert (cfg.d_ff, cfg.decoder_d_ff) == (1536, 768)  # both keep the preset's ratio to d_model
    assert fk.ModelConfig.from_preset("uneven-bart", d_model=384, decoder_d_ff=100).decoder_d_ff == 100
    assert fk.ModelConfig.from_preset("bart-base", d_model=384, d_ff=100).decoder_ff == 100  # null follows d_ff


def test_t5_cannot_hold_uneven_stacks():
    t5 = fk.ModelConfig.from_preset("t5-small", n_layers=1, d_model=32, n_heads=4, d_head=8, d_ff=48, vocab_size=64)
    assert "decoder_n_heads" not in json.dumps(fk.config_to_hf(t5))
    with pytest.raises(fk.ConfigError, match=r"decoder_n_heads=2 \(needs 4 or null: T5's stacks share n_heads\); "
                                             r"decoder_d_ff=24 \(needs 48 or null.*format='native'"):
        fk.config_to_hf(t5.replace(decoder_n_heads=2, decoder_d_ff=24))
    assert fk.config_to_hf(t5.replace(decoder_n_heads=4)) == fk.config_to_hf(t5)  # equal sizes are no difference
    bart = fk.ModelConfig.from_preset("bart-base", n_layers=1, d_model=32, n_heads=4, d_ff=48, vocab_size=64)
    with pytest.raises(fk.ConfigError, match=r"decoder_n_kv_heads=2 \(needs None\)"):
        fk.config_to_hf(bart.replace(decoder_n_heads=8, decoder_n_kv_heads=2))


def test_init_from_keeps_the_decoder_sizes(tmp_path):
    cfg = _s2s(decoder_n_heads=8, decoder_d_ff=24, n_decoder_layers=2)
    fk.save_pretrained(fk.Transformer(cfg), tmp_path)
    assert init_model_options(tmp_path, {"resid_dropout": 0.1}, {})["decoder_d_ff"] == 24
    with pytest.raises(fk.ConfigError, match=r"--model.decoder_d_ff \(checkpoint: 24\)"):
        init_model_options(tmp_path, {"decoder_d_ff": 32}, {})
