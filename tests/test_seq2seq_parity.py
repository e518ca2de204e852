"""BART and T5: parity with transformers on tiny random-init encoder-decoder checkpoints.

Each reference model is re-initialised with ``reinit_for_parity`` (std 0.3, random biases and
norm weights), saved with ``save_pretrained`` and loaded by formerkit. Logits agree within
``PARITY_TOL`` of their magnitude in float32 with padded sources and padded decoder inputs, and a
swapped GELU fails that comparison (the mutant check); formerkit -> HF dir -> transformers
reproduces them; cached decoding equals full recomputation; greedy ``generate`` and
``beam_search`` return what transformers' ``generate`` returns (sequences and scores).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import formerkit as fk
from conftest import PARITY_TOL, parity_error, reinit_for_parity, require
from formerkit.cache import KVCache
from formerkit.checkpoints import tied_names
from formerkit.checkpoints.hf import sources_from_hf, state_to_hf
from formerkit.checkpoints.hf_families import family_of
from formerkit.checkpoints.hf_maps import expand
from formerkit.checkpoints.loading import build_tensor
from formerkit.generate.beam import beam_search
from formerkit.layers.feedforward import ACTIVATIONS
from formerkit.layers.position import relative_bucket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = require("transformers")
transformers.logging.set_verbosity_error()

VOCAB, TOL, NEW = 96, 1e-4, 8  # TOL: formerkit against itself (cached = recomputed)


def _bart(cls=None, **kw):
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, max_position_embeddings=40, forced_eos_token_id=None, **kw)
    model = reinit_for_parity((cls or transformers.BartForConditionalGeneration)(cfg))
    if hasattr(model, "final_logits_bias"):
        model.final_logits_bias.normal_(0.0, 0.5)  # zeros at init: make it matter
    return model


def _bart_untied():
    """Untied output projection; the encoder's and decoder's token tables are copies of ``shared``."""
    model = _bart(tie_word_embeddings=False, scale_embedding=True, activation_function="relu")
    with torch.no_grad():
        for stack in (model.model.encoder, model.model.decoder):
            stack.embed_tokens.weight.copy_(model.model.shared.weight)
    return model


def _t5(cls=None, **kw):
    sizes = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
    cfg = transformers.T5Config(**{**sizes, **kw})
    return reinit_for_parity((cls or transformers.T5ForConditionalGeneration)(cfg))


REFERENCES = {
    "bart": lambda: _bart(),
    "bart-untied-scaled-relu": _bart_untied,
    "bart-base-model": lambda: _bart(transformers.BartModel),
    "t5": lambda: _t5(),
    "t5-v1.1": lambda: _t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-base-model": lambda: _t5(transformers.T5Model),
}


def _hub_t5_v11_layout(path):
    """Rewrite a saved T5 dir the way the hub's v1.1 checkpoints are: untied lm_head, tie_word_embeddings false."""
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("scale_decoder_outputs", None)
    (path / "config.json").write_text(json.dumps(config))
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(5))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module", params=sorted(REFERENCES) + ["t5-v1.1-hub-untied"])
def reference(request, tmp_path_factory):
    """(name, transformers model, its saved directory)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    REFERENCES[request.param.replace("-hub-untied", "")]().eval().save_pretrained(path)
    if request.param.endswith("hub-untied"):
        _hub_t5_v11_layout(path)
    model = transformers.AutoModel.from_pretrained(path) if "base-model" in request.param else \
        transformers.AutoModelForSeq2SeqLM.from_pretrained(path)
    return request.param, model.eval(), path


def _batch(seed: int = 0):
    """Sources (3, 11) right-padded to 11/7/4 tokens and decoder inputs (3, 9) with one padded row."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (3, 11), generator=g)
    src_mask = torch.ones_like(src)
    src_mask[1, 7:] = 0
    src_mask[2, 4:] = 0
    tgt = torch.randint(3, VOCAB, (3, 9), generator=g)
    tgt_mask = torch.ones_like(tgt)
    tgt_mask[1, 6:] = 0
    return src, src_mask, tgt, tgt_mask


def _reference(model, src, src_mask, tgt, tgt_mask):
    """(logits or None, decoder hidden states, encoder hidden states) of a transformers model."""
    with torch.no_grad():
        out = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask,
                    output_hidden_states=True)
    logits = getattr(out, "logits", None)
    decoder = out.decoder_hidden_states[-1] if logits is not None else out.last_hidden_state
    return logits, decoder, out.encoder_last_hidden_state


def _ours(model, src, src_mask, tgt, tgt_mask):
    with torch.no_grad():
        return model(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)


def _errors(ours, hf, batch) -> list[float]:
    """parity_error of formerkit's encoder output, decoder output and logits against transformers', at real tokens."""
    src, src_mask, tgt, tgt_mask = batch
    logits, decoder, encoder = _reference(hf, *batch)
    out = _ours(ours, *batch)
    valid = tgt_mask.bool()
    errors = [parity_error(out.encoder_hidden_states, encoder, src_mask.bool()),
              parity_error(out.hidden_states, decoder, valid)]
    if logits is not None:
        errors.append(parity_error(out.logits, logits, valid))
        assert logits.abs().max() > 1.0  # the comparison is not between two near-zeros
    return errors


def test_load_matches_transformers(reference):
    name, hf, path = reference
    ours = fk.from_pretrained(path)
    batch = _batch()
    assert max(_errors(ours, hf, batch)) < PARITY_TOL
    if ours.lm_head is None:
        assert "base-model" in name
        return
    # eager attention (explicit probabilities, relative bias added to the scores) agrees with sdpa
    eager = fk.Transformer(ours.config.replace(attn_backend="eager")).eval()
    eager.load_state_dict(ours.state_dict())
    assert parity_error(_ours(eager, *batch).logits, _ours(ours, *batch).logits, batch[3].bool()) < PARITY_TOL


@pytest.mark.parametrize("name, real, other", [("bart", "gelu", "gelu_tanh"), ("t5-v1.1", "gelu_tanh", "gelu")])
def test_a_swapped_activation_fails_the_parity_check(name, real, other, tmp_path, monkeypatch):
    """The mutant check: formerkit built with the other GELU fails test_load_matches_transformers' comparison."""
    torch.manual_seed(0)
    hf = REFERENCES[name]().eval()
    hf.save_pretrained(tmp_path)
    monkeypatch.setitem(ACTIVATIONS, real, ACTIVATIONS[other])
    errors = _errors(fk.from_pretrained(tmp_path), hf, _batch())
    assert errors[0] > 3 * PARITY_TOL and errors[-1] > 3 * PARITY_TOL  # the encoder already, and the logits


def test_config_reads_the_family(reference):
    name, hf, path = reference
    cfg = fk.from_pretrained(path).config
    if name.startswith("bart"):
        assert (cfg.position, cfg.position_offset, cfg.norm_placement, cfg.embed_norm) == ("learned", 2, "post", True)
        assert cfg.lm_head_bias == (cfg.head == "lm") and cfg.decoder_start_token_id == 2
        assert cfg.embed_scale == (name == "bart-untied-scaled-relu")
    else:
        assert (cfg.position, cfg.relative_buckets, cfg.relative_max_distance) == ("relative", 8, 16)
        assert (cfg.norm, cfg.attn_scale, cfg.qkv_bias, cfg.decoder_start_token_id) == ("rmsnorm", 1.0, False, 0)
        assert cfg.gated == ("v1.1" in name) and cfg.activation == ("gelu_tanh" if cfg.gated else "relu")
        # original T5 rescales its tied head; v1.1 does not (tied in transformers 5, untied on the hub)
        assert cfg.lm_head_scale == (name == "t5")
        assert cfg.tie_embeddings == (name != "t5-v1.1-hub-untied")
    assert (cfg.n_layers, cfg.decoder_layers) == ((2, 1) if name.startswith("bart") else (2, 3))


def test_round_trip_through_hf_dir(reference, tmp_path):
    name, hf, path = reference
    ours = fk.from_pretrained(path)
    fk.save_pretrained(ours, tmp_path, format="hf")
    reloaded = type(hf).from_pretrained(tmp_path).eval()
    batch = _batch(seed=1)
    expected, again = _reference(hf, *batch), _reference(reloaded, *batch)  # (logits, decoder, encoder)
    valid = batch[3].bool()
    for a, b in zip(expected[:2], again[:2], strict=True):
        if a is not None:
            assert parity_error(b, a, valid) < PARITY_TOL
    assert fk.from_pretrained(tmp_path).config == ours.config


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_cached_decoding_equals_recomputation(name):
    """Prefill 3 decoder tokens, then one at a time: the relative bias must use the cached query positions."""
    torch.manual_seed(0)
    hf = REFERENCES[name]().eval()
    cfg = fk.config_from_hf(hf.config.to_dict())
    model = fk.Transformer(cfg).eval()  # formerkit's own random init (T5's bias is normal, not zero)
    src, src_mask, tgt, _ = _batch(seed=2)
    with torch.no_grad():
        full = model(src, src_mask, decoder_input_ids=tgt).logits  # (B, T, V)
        cache = KVCache.for_model(model, src.shape[0], tgt.shape[1])
        pieces = [model(src, src_mask, decoder_input_ids=tgt[:, :3], cache=cache).logits]
        pieces += [model(None, decoder_input_ids=tgt[:, t:t + 1], cache=cache).logits for t in range(3, tgt.shape[1])]
    assert (torch.cat(pieces, 1) - full).abs().max() < TOL


def test_relative_positions_in_a_decoder_only_model():
    """position='relative' outside T5: a causal stack's bias with left padding, cached = recomputed."""
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=48, n_layers=2,
                                          position="relative", relative_buckets=8, relative_max_distance=16)).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, mask, position_ids=positions).logits
        cache = KVCache.for_model(model, 2, 12)
        pieces = [model(ids[:, :5], mask[:, :5], position_ids=positions[:, :5], cache=cache).logits]
        pieces += [model(ids[:, t:t + 1], mask[:, :t + 1], position_ids=positions[:, t:t + 1], cache=cache).logits
                   for t in range(5, 12)]
    assert (torch.cat(pieces, 1) - full)[mask.bool()].abs().max() < TOL
    assert model.pos_bias is not None and not model.pos_bias.bidirectional


# ---------------------------------------------------------------- generation against transformers


@pytest.fixture(scope="module", params=["bart", "t5"])
def peaked(request, tmp_path_factory):
    """(name, transformers model with peaked next-token distributions, formerkit copy)."""
    torch.manual_seed(0)
    if request.param == "bart":
        hf = _bart(init_std=0.3)
    else:
        # equal depths: transformers' decoder cache sizes itself by num_layers, not num_decoder_layers
        hf = _t5(initializer_factor=3.0, num_decoder_layers=2)
    path = tmp_path_factory.mktemp(f"peaked-{request.param}")
    hf.eval().save_pretrained(path)
    return request.param, hf, fk.from_pretrained(path)


def _sources():
    """Two sources, the second right-padded: ids and mask (2, 7)."""
    src = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    return src, mask


def _hf_generate(hf, src, mask, eos, pad, **kw):
    with torch.no_grad():
        return hf.generate(src, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                           max_new_tokens=NEW, output_scores=True, return_dict_in_generate=True, **kw)


def _greedy_tokens(ours, src, mask) -> torch.Tensor:
    """formerkit's first three greedy tokens of each source, without EOS: (B, 3)."""
    return fk.generate(ours, src, attention_mask=mask, max_new_tokens=3, eos_token_id=[])[:, 1:]


def test_greedy_generate_equals_transformers(peaked):
    name, hf, ours = peaked
    src, mask = _sources()
    pad = hf.config.pad_token_id
    eos = [int(_greedy_tokens(ours, src, mask)[0, 2])]  # the first source ends after three tokens
    expected = _hf_generate(hf, src, mask, eos, pad, num_beams=1).sequences
    got = fk.generate(ours, src, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    assert got[0, 0] == (2 if name == "bart" else 0)  # the decoder start token comes from config.json
    assert eos[0] in got[0, 1:4].tolist()  # row 0 stopped early (and was padded after)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, n_return", [
    (3, 1.0, True, 2),
    (4, 0.5, False, 2),
    (2, 2.0, "never", 2),
])
def test_beam_search_equals_transformers(peaked, num_beams, length_penalty, early_stopping, n_return):
    name, hf, ours = peaked
    src, mask = _sources()
    pad = hf.config.pad_token_id
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=n_return)
    eos = sorted(set(_greedy_tokens(ours, src, mask)[:, 0].tolist()))  # each source's likeliest first token ends
    ref = _hf_generate(hf, src, mask, eos, pad, **kw)
    fill = pad or eos[0]  # transformers' beam search fills with `pad_token_id or eos[0]`: EOS for T5's pad 0
    out = beam_search(ours, src, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=fill, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert (out.scores - ref.sequences_scores).abs().max() < 1e-4


# ---------------------------------------------------------------- tables, configs, closed forms


def _small(family: str, **kw) -> fk.Transformer:
    base = dict(kind="encoder-decoder", vocab_size=64, d_model=32, n_heads=4, d_ff=48, n_layers=2,
                n_decoder_layers=3, max_seq_len=32)
    if family == "bart":
        base.update(position="learned", position_offset=2, norm_placement="post", final_norm=False, embed_norm=True,
                    activation="gelu", lm_head_bias=True, decoder_start_token_id=2, pad_token_id=1, eos_token_id=2)
    else:
        base.update(position="relative", norm="rmsnorm", norm_bias=False, qkv_bias=False, out_bias=False,
                    mlp_bias=False, attn_scale=1.0, activation="relu", d_head=8, lm_head_scale=True,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("family, kw", [
    ("bart", {}), ("bart", {"tie_embeddings": False}), ("bart", {"head": "none", "lm_head_bias": False}),
    ("t5", {}), ("t5", {"gated": True, "activation": "gelu_tanh", "tie_embeddings": False, "lm_head_scale": False}),
])
def test_name_tables_round_trip_both_ways(family, kw):
    model = _small(family, **kw)
    tied = tied_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    hf_config, hf_state = state_to_hf(model.config, state, tied)
    assert hf_config["model_type"] == family == family_of(model.config).model_type
    sources = sources_from_hf(model.config, family_of(model.config), hf_state, model.state_dict(), tied)
    assert sources.keys() == state.keys()
    assert all(torch.equal(build_tensor(sources[name], hf_state), tensor) for name, tensor in state.items())
    rules = expand(family_of(model.config).weights(model.config), 2, 3)
    assert len({r[0] for r in rules}) == len(rules)
    assert len({n for r in rules for n in r[1]}) == sum(len(r[1]) for r in rules)
    assert fk.config_from_hf(hf_config) == model.config


def test_diverging_embedding_copies_are_refused(tmp_path):
    hf = _bart().eval()
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.encoder.embed_tokens.weight"] = state["model.shared.weight"] + 1
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(fk.CheckpointError, match="encoder.embed_tokens.weight differs from shared.weight"):
        fk.from_pretrained(tmp_path)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_equal_t5s(bidirectional):
    offsets = torch.arange(-300, 300)[None, :]
    for n_buckets, max_distance in [(32, 128), (8, 16), (4, 3)]:
        ours = relative_bucket(offsets, bidirectional=bidirectional, n_buckets=n_buckets, max_distance=max_distance)
        theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            offsets, bidirectional=bidirectional, num_buckets=n_buckets, max_distance=max_distance)
        assert torch.equal(ours, theirs)


def test_hook_pattern_sees_probabilities_with_the_relative_bias():
    model = _small("t5")
    src, tgt = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        plain = model(src, decoder_input_ids=tgt).logits
    seen = {}
    handle = model.decoder.blocks[1].attn.hook_pattern.register_forward_hook(
        lambda module, inputs, out: seen.setdefault("pattern", out))
    with torch.no_grad():
        hooked = model(src, decoder_input_ids=tgt).logits
    handle.remove()
    pattern = seen["pattern"]  # (B, H, T, T) after softmax, causal
    assert pattern.shape == (2, 4, 5, 5)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 5))
    assert float(pattern.triu(1).abs().max()) == 0.0
    assert (hooked - plain).abs().max() < 1e-5


@pytest.mark.parametrize("hf, fragment", [
    ({"model_type": "t5", "feed_forward_proj": "fancy-relu"}, "not a T5 feed-forward type"),
    ({"model_type": "t5", "feed_forward_proj": "gated-mish"}, "mish"),
    ({"model_type": "bart", "d_model": 32, "encoder_attention_heads": 4, "decoder_attention_heads": 6},
     "not divisible by decoder_n_heads=6"),
    ({"model_type": "bart", "architectures": ["BartForSequenceClassification"]}, "not supported"),
    ({"model_type": "t5", "architectures": ["T5EncoderModel"]}, "T5EncoderModel"),
])
def test_from_hf_rejects_what_it_cannot_express(hf, fragment):
    with pytest.raises(fk.ConfigError, match=fragment):
        fk.config_from_hf(hf)


def test_to_hf_names_what_does_not_fit():
    with pytest.raises(fk.ConfigError, match=r"qkv_bias=True \(needs False\).*format='native'"):
        fk.config_to_hf(_small("t5", qkv_bias=True).config)
    with pytest.raises(fk.ConfigError, match=r"position_offset=0 \(needs 2\)"):
        fk.config_to_hf(_small("bart", position_offset=0).config)
    with pytest.raises(fk.ConfigError, match="gated exact GELU"):
        fk.config_to_hf(_small("t5", gated=True, activation="gelu").config)
    with pytest.raises(fk.ConfigError, match=r"encoder-decoder has position 'learned' \(bart\) or 'relative' \(t5\)"):
        fk.config_to_hf(_small("t5", position="rope").config)


@pytest.mark.parametrize("kw, fragment", [
    (dict(position="rope", position_offset=2), "position_offset=2 applies to position='learned' only"),
    (dict(position_offset=-1), "position_offset must be an integer >= 0"),
    (dict(position="relative", relative_buckets=2), "relative_buckets must be >= 4"),
    (dict(position="relative", relative_buckets=32, relative_max_distance=16), "must exceed relative_buckets // 2"),
    (dict(head="none", lm_head_scale=True), "lm_head_scale=True needs head='lm'"),
    (dict(kind="decoder", decoder_start_token_id=0), "decoder_start_token_id applies to encoder-decoder"),
    (dict(decoder_start_token_id=64), r"decoder_start_token_id must be a token id in \[0, 64\)"),
])
def test_config_validation(kw, fragment):
    base = dict(kind="encoder-decoder", vocab_size=64, d_model=32, n_heads=4, d_ff=48, n_layers=1)
    with pytest.raises(fk.ConfigError, match=fragment):
        fk.ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("preset", ["bart-base", "t5-small", "t5-v1.1-small"])
def test_presets_match_the_published_shapes(preset):
    """The presets equal what from_hf reads from transformers' configs of the published models."""
    shapes = {
        "bart-base": transformers.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=3072,
                                             decoder_ffn_dim=3072, encoder_attention_heads=12,
                                             decoder_attention_heads=12),
        "t5-small": transformers.T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
        "t5-v1.1-small": transformers.T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                                               feed_forward_proj="gated-gelu"),
    }
    hf = shapes[preset].to_dict()
    if preset == "t5-v1.1-small":  # the published config.json (transformers 5 rewrites this key when it builds one)
        hf = {**hf, "tie_word_embeddings": False, "scale_decoder_outputs": False}
    assert fk.ModelConfig.from_preset(preset) == fk.config_from_hf(hf)
