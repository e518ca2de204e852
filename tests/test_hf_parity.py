"""Parity with the reference implementation (transformers) on tiny random-init checkpoints.

Each reference model is re-initialised with ``reinit_for_parity`` (std 0.3, random biases and
norm weights), saved with ``save_pretrained`` and loaded by formerkit; logits and final hidden
states must agree within ``PARITY_TOL`` of their magnitude in float32, with and without a padded
mask. The round trip formerkit -> HF dir -> transformers must reproduce the same logits. A mutant
check swaps formerkit's GELU for the tanh approximation (and back) and requires the same
comparison to fail.
"""

from __future__ import annotations

import os

import pytest
import torch

import formerkit as fk
from conftest import PARITY_TOL, parity_error, reinit_for_parity, require
from formerkit.layers.feedforward import ACTIVATIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = require("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96


def _gpt2(**kw):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=1, eos_token_id=2, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(cls=None, config_cls=None, **kw):
    config_cls = config_cls or transformers.LlamaConfig
    cls = cls or transformers.LlamaForCausalLM
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    return cls(config_cls(**{**base, **kw}))


def _bert(cls=None, **kw):
    cls = cls or transformers.BertForMaskedLM
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                  vocab_size=VOCAB, max_position_embeddings=64, **kw)
    return cls(cfg)


REFERENCES = {
    "gpt2": lambda: _gpt2(),
    "gpt2-untied-relu": lambda: _gpt2(tie_word_embeddings=False, activation_function="relu", n_inner=80),
    "gpt2-base-model": lambda: transformers.GPT2Model(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2)),
    "llama-gqa": lambda: _llama(),
    "llama-mqa-tied-theta": lambda: _llama(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-head-dim-bias": lambda: _llama(head_dim=24, attention_bias=True, mlp_bias=True),
    "mistral": lambda: _llama(transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=4),
    "qwen2": lambda: _llama(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, tie_word_embeddings=True),
    "qwen3": lambda: _llama(transformers.Qwen3ForCausalLM, transformers.Qwen3Config, head_dim=16),
    "bert-mlm": lambda: _bert(),
    "bert-base-model": lambda: _bert(transformers.BertModel),
    "bert-classifier": lambda: _bert(transformers.BertForSequenceClassification, num_labels=3),
}


def _inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


def _reference_outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = getattr(out, "logits", None)
    hidden = out.hidden_states[-1] if out.hidden_states is not None else out.last_hidden_state
    return logits, hidden


def _build(name: str):
    """The reference model ``name``, re-initialised so that parity can fail, in eval mode."""
    torch.manual_seed(0)
    return reinit_for_parity(REFERENCES[name]()).eval()


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference(request, tmp_path_factory):
    model = _build(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def _errors(ours, model, ids, mask) -> list[float]:
    """parity_error of formerkit's logits and final hidden states against the reference's, at real tokens."""
    logits, hidden = _reference_outputs(model, ids, mask)
    with torch.no_grad():
        out = ours(ids, mask)
    valid = mask.bool()
    errors = [parity_error(out.hidden_states, hidden, valid)]
    if logits is not None:
        assert out.logits is not None
        errors.append(parity_error(out.logits, logits, valid if logits.dim() == 3 else None))
        assert logits.abs().max() > 1.0  # the comparison is not between two near-zeros
    return errors


def test_load_matches_reference(reference):
    name, model, path = reference
    ours = fk.from_pretrained(path)
    ids, mask = _inputs(VOCAB)
    assert max(_errors(ours, model, ids, mask)) < PARITY_TOL
    # without any mask, every position must match
    assert max(_errors(ours, model, ids, torch.ones_like(ids))) < PARITY_TOL


MUTANTS = {"gpt2": ("gelu_tanh", "gelu"), "bert-mlm": ("gelu", "gelu_tanh"), "bert-classifier": ("gelu", "gelu_tanh")}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_a_swapped_activation_fails_the_parity_check(name, tmp_path, monkeypatch):
    """The mutant check: formerkit built with the other GELU fails the comparison test_load_matches_reference makes."""
    model = _build(name)
    model.save_pretrained(tmp_path)
    real, other = MUTANTS[name]
    monkeypatch.setitem(ACTIVATIONS, real, ACTIVATIONS[other])
    mutant = fk.from_pretrained(tmp_path)
    ids, mask = _inputs(VOCAB)
    assert min(_errors(mutant, model, ids, mask)) > 3 * PARITY_TOL


def test_round_trip_through_hf_dir(reference, tmp_path):
    name, model, path = reference
    ours = fk.from_pretrained(path)
    fk.save_pretrained(ours, tmp_path, format="hf")
    reloaded = type(model).from_pretrained(tmp_path).eval()
    ids, mask = _inputs(VOCAB, seed=1)
    logits, hidden = _reference_outputs(model, ids, mask)
    logits2, hidden2 = _reference_outputs(reloaded, ids, mask)
    valid = mask.bool()
    assert parity_error(hidden2, hidden, valid) < PARITY_TOL
    if logits is not None:
        assert parity_error(logits2, logits) < PARITY_TOL
    # and the written config maps back to the same formerkit config
    assert fk.from_pretrained(tmp_path).config == ours.config


def test_pytorch_bin_and_sharded_checkpoints(tmp_path):
    torch.manual_seed(1)
    model = reinit_for_parity(_llama(), seed=1).eval()
    ids, mask = _inputs(VOCAB)
    logits, _ = _reference_outputs(model, ids, mask)
    bin_dir, shard_dir = tmp_path / "bin", tmp_path / "sharded"
    model.save_pretrained(shard_dir, max_shard_size="20KB")
    assert (shard_dir / "model.safetensors.index.json").is_file()
    bin_dir.mkdir()
    model.config.save_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    for directory in (bin_dir, shard_dir):
        with torch.no_grad():
            out = fk.from_pretrained(directory)(ids, mask)
        assert parity_error(out.logits, logits, mask.bool()) < PARITY_TOL


def test_config_from_hf_reads_fields_not_names():
    cfg = fk.config_from_hf({
        "model_type": "llama", "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
        "num_key_value_heads": 2, "intermediate_size": 200, "vocab_size": 500, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
    })
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff) == (96, 3, 6, 2, 16, 200)
    assert cfg.rope_theta == 1e6 and cfg.tie_embeddings and cfg.norm == "rmsnorm" and cfg.gated
    assert fk.config_to_hf(cfg)["num_key_value_heads"] == 2
    again = fk.config_from_hf(fk.config_to_hf(cfg))
    assert again == cfg


@pytest.mark.parametrize("hf, fragment", [
    ({"model_type": "gpt_neox"}, "not supported"),
    ({"hidden_size": 8}, "model_type"),
    ({"model_type": "bert", "position_embedding_type": "relative_key"}, "relative_key"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"model_type": "gpt2", "activation_function": "mish"}, "mish"),
    ({"model_type": "gpt2", "n_embd": 10, "n_head": 3}, "divisible"),
])
def test_from_hf_rejects_what_it_cannot_express(hf, fragment):
    with pytest.raises(fk.ConfigError, match=fragment):
        fk.config_from_hf(hf)


def test_to_hf_rejects_configs_without_an_hf_family():
    for cfg in [
        fk.ModelConfig.from_preset("vaswani-base", n_layers=1),
        fk.ModelConfig.from_preset("gpt2", n_layers=1, parallel_block=True),
        fk.ModelConfig.from_preset("llama", n_layers=1, rotary_fraction=0.5),
        fk.ModelConfig(kind="decoder", position="alibi"),
    ]:
        with pytest.raises(fk.ConfigError, match="format='native'"):
            fk.config_to_hf(cfg)
