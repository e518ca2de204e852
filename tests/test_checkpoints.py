"""Native and Hugging Face checkpoint I/O: round trips, name tables both ways, and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import formerkit as fk
from formerkit.checkpoints import tied_names
from formerkit.checkpoints.hf import sources_from_hf, state_to_hf
from formerkit.checkpoints.hf_families import FAMILIES, family_of
from formerkit.checkpoints.hf_maps import expand
from formerkit.checkpoints.loading import build_tensor

SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=32)


def _small(preset: str, **kw) -> fk.Transformer:
    extra = {"n_kv_heads": 2} if preset == "llama" else {}
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **extra, **kw})).eval()


def _ids(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


def _run(model, ids):
    kw = {"decoder_input_ids": ids} if model.config.kind == "encoder-decoder" else {}
    with torch.no_grad():
        return model(ids, **kw)


@pytest.mark.parametrize("preset", ["gpt2", "llama", "bert-base", "minilm-l6", "vaswani-base"])
def test_native_round_trip(preset, tmp_path):
    model = _small(preset)
    fk.save_pretrained(model, tmp_path)
    assert (tmp_path / "formerkit_config.json").is_file()
    loaded = fk.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = _ids(model)
    a, b = _run(model, ids), _run(loaded, ids)
    assert torch.equal(a.hidden_states, b.hidden_states)
    if model.config.tie_embeddings and loaded.lm_head is not None:
        assert loaded.lm_head.proj.weight is loaded.tok_embed.weight
    # the tied output projection is stored once, and nothing is pickled
    stored = load_file(tmp_path / "model.safetensors")
    assert "lm_head.proj.weight" not in stored or not model.config.tie_embeddings


@pytest.mark.parametrize("preset, kw", [
    ("gpt2", {}), ("gpt2", {"tie_embeddings": False}), ("llama", {}), ("llama", {"qk_norm": True}),
    ("llama", {"qkv_bias": True}), ("llama", {"sliding_window": 4}), ("bert-base", {}),
    ("minilm-l6", {}), ("bert-base", {"head": "classifier", "pooler": True, "num_labels": 5}),
    ("llama", {"n_experts": 4}),
    ("llama", {"n_experts": 3, "qkv_bias": True, "out_bias": False, "shared_expert_d_ff": 16, "moe_dense_layers": [0]}),
])
def test_name_tables_round_trip_both_ways(preset, kw):
    model = _small(preset, **kw)
    tied = tied_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    hf_config, hf_state = state_to_hf(model.config, state, tied)
    family = family_of(model.config)
    assert hf_config["model_type"] == family.model_type
    sources = sources_from_hf(model.config, family, hf_state, model.state_dict(), tied)
    assert sources.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(build_tensor(sources[name], hf_state), tensor), name
    # every rule of the family's table names a distinct tensor on both sides
    rules = expand(family.weights(model.config), 2)
    assert len({r[0] for r in rules}) == len(rules)
    assert len({n for r in rules for n in r[1]}) == sum(len(r[1]) for r in rules)


def test_the_registry_holds_every_family():
    assert set(FAMILIES) == {"gpt2", "bert", "llama", "mistral", "qwen2", "qwen3", "vit", "bart", "t5", "mixtral",
                             "qwen2_moe"}
    assert all(f.model_type == name for name, f in FAMILIES.items())


def _hf_dir(tmp_path, preset="gpt2"):
    model = _small(preset)
    fk.save_pretrained(model, tmp_path, format="hf")
    return model


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    _hf_dir(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    del state["transformer.h.1.ln_2.weight"]
    state["transformer.h.0.attn.c_proj.bias"] = torch.zeros(5)
    state["transformer.extra.weight"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(fk.CheckpointError) as err:
        fk.from_pretrained(tmp_path)
    message = str(err.value)
    assert "h.1.ln_2.weight" in message and "missing" in message
    assert "extra.weight" in message and "unexpected" in message
    assert "h.0.attn.c_proj.bias" in message and "(5,)" in message


def test_native_mismatch_is_listed(tmp_path):
    model = _small("llama")
    fk.save_pretrained(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("blocks.0.ln1.weight")
    state["blocks.1.attn.qkv.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(fk.CheckpointError, match=r"missing: blocks\.0\.ln1\.weight.*wrong shapes: blocks\.1"):
        fk.from_pretrained(tmp_path)


def test_directory_errors(tmp_path):
    with pytest.raises(fk.CheckpointError, match="does not exist"):
        fk.from_pretrained(tmp_path / "nope")
    with pytest.raises(fk.CheckpointError, match="neither"):
        fk.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(fk.CheckpointError, match='"mamba" is not supported'):
        fk.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(fk.CheckpointError, match="not valid JSON"):
        fk.from_pretrained(tmp_path)


def test_no_weights_and_corrupt_weights(tmp_path):
    _hf_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(fk.CheckpointError, match="cannot read"):
        fk.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(fk.CheckpointError, match="no weights"):
        fk.from_pretrained(tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_files_are_read_weights_only(tmp_path):
    model = _hf_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = fk.from_pretrained(tmp_path)
    ids = _ids(model)
    assert torch.allclose(_run(loaded, ids).logits, _run(model, ids).logits)
    torch.save({"x": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(fk.CheckpointError):
        fk.from_pretrained(tmp_path)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _small("gpt2")
    fk.save_pretrained(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import formerkit.checkpoints.files as files

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", crash)
    with torch.no_grad():
        model.tok_embed.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        fk.save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["formerkit_config.json", "model.safetensors"]
    fk.from_pretrained(tmp_path)  # still loads


def test_hf_save_rejects_inexpressible_configs(tmp_path):
    with pytest.raises(fk.ConfigError, match="format='native'"):
        fk.save_pretrained(_small("vaswani-base"), tmp_path, format="hf")
    with pytest.raises(fk.InputError, match="format"):
        fk.save_pretrained(_small("gpt2"), tmp_path, format="onnx")


def test_load_with_dtype(tmp_path):
    fk.save_pretrained(_small("llama"), tmp_path)
    model = fk.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.tok_embed.weight.dtype == torch.bfloat16 and not model.training
    out = _run(model, _ids(model))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
