"""LoRA adapters: formerkit's against peft's (the reference), both ways, on tiny random HF checkpoints.

Each base model is a transformers model re-initialised with ``reinit_for_parity`` (std 0.3)
and saved to a tmp dir; formerkit loads it with ``from_pretrained``. Adapters get non-zero A
and B, so an adapter dropped, misplaced or mis-scaled changes the logits far beyond 1e-4.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import formerkit as fk
from conftest import parity_error, reinit_for_parity, require
from formerkit.compress import (
    LoraLinear,
    add_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from formerkit.errors import CheckpointError, InputError
from formerkit.layers.quantized import quantize_int8

peft = require("peft")
transformers = require("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB = 96
TOL = 1e-4


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _bert(cls=transformers.BertForMaskedLM):
    return cls(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64))


BASES = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "bert-base-model": lambda: _bert(transformers.BertModel)}


def _hf(name: str):
    torch.manual_seed(0)
    return reinit_for_parity(BASES[name]()).eval()


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """name -> directory of the saved reference model."""
    out = {}
    for name in BASES:
        path = tmp_path_factory.mktemp(name)
        _hf(name).save_pretrained(path)
        out[name] = path
    return out


def _ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _hf_out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _fk_out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if out.logits is not None else out.hidden_states


def _randomize(params, seed: int = 0, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


CASES = [  # (base, formerkit targets)
    ("gpt2", ["q", "v"]),  # two slices of the fused qkv -> one rank-2r c_attn LoRA
    ("gpt2", "all-linear"),
    ("llama", ["q", "v", "fc_gate"]),
    ("llama", ["qkv", "out"]),  # the whole fused layer -> q/k/v_proj sharing A
    ("bert", ["q", "k", "v", "fc_out"]),  # fc_out (output.dense) but not out (attention.output.dense)
    ("bert-base-model", ["v", "out", "fc_in"]),
]


@pytest.mark.parametrize(("base", "targets"), CASES, ids=[f"{b}-{t if isinstance(t, str) else '+'.join(t)}"
                                                           for b, t in CASES])
def test_formerkit_adapter_loads_in_peft(base_dirs, tmp_path, base, targets):
    model = add_lora(fk.from_pretrained(base_dirs[base]), r=4, alpha=8, target_modules=targets)
    _randomize(lora_parameters(model))
    save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(_hf(base), tmp_path).eval()
    ids = _ids()
    ours, theirs = _fk_out(model, ids), _hf_out(reference, ids)
    plain = _hf_out(_hf(base), ids)
    assert parity_error(ours, theirs) < TOL
    assert parity_error(plain, theirs) > 100 * TOL  # the adapter does change the output


def test_gpt2_q_and_v_become_one_double_rank_c_attn(base_dirs, tmp_path):
    model = add_lora(fk.from_pretrained(base_dirs["gpt2"]), r=4, alpha=8, target_modules=["q", "v", "out"])
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["attn.c_proj", "c_attn"]
    assert sorted(config["rank_pattern"].values()) == [8, 8] and sorted(config["alpha_pattern"].values()) == [16, 16]


PEFT_CASES = [  # (base, peft target_modules, fan_in_fan_out)
    ("gpt2", ["c_attn", "mlp.c_proj"], True),
    ("llama", ["q_proj", "v_proj", "down_proj"], False),
    ("llama", "all-linear", False),
    ("bert", ["query", "value", "attention.output.dense"], False),
    ("bert-base-model", ["key", "intermediate.dense"], False),
]


@pytest.mark.parametrize(("base", "targets", "fan"), PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_peft_adapter_loads_in_formerkit(base_dirs, tmp_path, base, targets, fan):
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, fan_in_fan_out=fan,
                             rank_pattern={"layers.1.self_attn.v_proj": 6} if base == "llama" else {})
    reference = peft.get_peft_model(_hf(base), config).eval()
    _randomize([p for n, p in reference.named_parameters() if "lora_" in n], seed=3)
    reference.save_pretrained(tmp_path)
    model = load_adapter(fk.from_pretrained(base_dirs[base]), tmp_path)
    ids = _ids()
    assert parity_error(_fk_out(model, ids), _hf_out(reference, ids)) < TOL
    assert parity_error(_fk_out(fk.from_pretrained(base_dirs[base]), ids), _hf_out(reference, ids)) > 100 * TOL


def test_rslora_scale_is_read(base_dirs, tmp_path):
    reference = peft.get_peft_model(_hf("llama"), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                   target_modules=["o_proj"])).eval()
    _randomize([p for n, p in reference.named_parameters() if "lora_" in n], seed=4)
    reference.save_pretrained(tmp_path)
    model = load_adapter(fk.from_pretrained(base_dirs["llama"]), tmp_path)
    ids = _ids()
    assert parity_error(_fk_out(model, ids), _hf_out(reference, ids)) < TOL


def test_adapter_round_trips_through_formerkit(base_dirs, tmp_path):
    model = add_lora(fk.from_pretrained(base_dirs["llama"]), r=2, alpha=6, target_modules=["qkv", "fc_out"])
    _randomize(lora_parameters(model))
    save_adapter(model, tmp_path)
    again = load_adapter(fk.from_pretrained(base_dirs["llama"]), tmp_path)
    ids = _ids()
    assert parity_error(_fk_out(again, ids), _fk_out(model, ids)) < TOL


@pytest.mark.parametrize("base", ["gpt2", "llama"])
def test_merge_then_unmerge(base_dirs, tmp_path, base):
    model = add_lora(fk.from_pretrained(base_dirs[base]), r=4, alpha=8, target_modules=["q", "v", "fc_in"])
    _randomize(lora_parameters(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    unmerged = _fk_out(model, ids)
    merged = _fk_out(merge_lora(model), ids)
    assert parity_error(merged, unmerged) < TOL
    assert not torch.allclose(model.blocks[0].attn.qkv.base.weight, before["blocks.0.attn.qkv.base.weight"])
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    assert parity_error(_fk_out(model, ids), unmerged) < TOL
    with pytest.raises(InputError, match="carries LoRA adapters"):
        fk.save_pretrained(model, tmp_path, format="hf")
    plain = unload_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert parity_error(_fk_out(plain, ids), unmerged) < TOL
    fk.save_pretrained(plain, tmp_path / "merged", format="hf")
    assert parity_error(_fk_out(fk.from_pretrained(tmp_path / "merged"), ids), unmerged) < TOL


def test_only_lora_parameters_train(base_dirs):
    model = add_lora(fk.from_pretrained(base_dirs["llama"]), r=4, alpha=8, target_modules=["q", "v"])
    _randomize(lora_parameters(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.adapters.{s}.lora_{f}.weight"
                         for i in range(2) for s in "qv" for f in "AB"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = _ids()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


def test_adapter_for_another_base_is_refused(base_dirs, tmp_path):
    model = add_lora(fk.from_pretrained(base_dirs["gpt2"]), r=4, alpha=8, target_modules=["q", "v"])
    save_adapter(model, tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match=r"not modules of this model: base_model\.model\.transformer\.h\.0"):
        load_adapter(fk.from_pretrained(base_dirs["llama"]), tmp_path / "gpt2")
    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer\.h\.0\.attn\.c_attn: lora_A \(8, 32\)"):
        load_adapter(fk.from_pretrained(tmp_path / "wider"), tmp_path / "gpt2")


def test_dropout_does_nothing_in_eval_mode(base_dirs):
    ids = _ids()
    outs = []
    for dropout in (0.0, 0.5):
        torch.manual_seed(0)
        model = add_lora(fk.from_pretrained(base_dirs["bert"]), r=4, alpha=8, dropout=dropout,
                         target_modules="all-linear")
        _randomize(lora_parameters(model))
        outs.append(_fk_out(model.eval(), ids))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, outs[0])  # in training, dropout does act


def test_int8_base_runs_but_refuses_to_merge(base_dirs):
    model = add_lora(quantize_int8(fk.from_pretrained(base_dirs["gpt2"])), r=4, alpha=8, target_modules=["q", "v"])
    _randomize(lora_parameters(model))
    assert torch.isfinite(_fk_out(model, _ids())).all()
    with pytest.raises(InputError, match="cannot merge LoRA into an int8"):
        merge_lora(model)


def test_bad_targets_are_refused(base_dirs):
    with pytest.raises(InputError, match="unknown LoRA target"):
        add_lora(fk.from_pretrained(base_dirs["gpt2"]), target_modules=["query"])
    with pytest.raises(InputError, match="match no layer"):
        add_lora(fk.from_pretrained(base_dirs["gpt2"]), target_modules=["fc_gate"])
    model = fk.from_pretrained(base_dirs["gpt2"])
    with pytest.raises(InputError, match="both act on the rows"):
        add_lora(model, target_modules=["qkv", "q"])
    assert all(p.requires_grad for p in model.parameters())  # a refused call leaves the model as it was
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_config_built_model_saves_under_its_family_names(tmp_path):
    cfg = fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, max_seq_len=32)
    model = add_lora(fk.Transformer(cfg).eval(), r=2, alpha=4, target_modules=["v"])
    _randomize(lora_parameters(model))
    save_adapter(model, tmp_path / "adapter")
    fk.save_pretrained(_plain_copy(model, cfg), tmp_path / "base", format="hf")
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    ids = _ids()
    assert parity_error(_fk_out(model, ids), _hf_out(reference, ids)) < TOL


def _bart():
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=VOCAB, max_position_embeddings=64))


def test_encoder_decoder_cross_attention_both_ways(tmp_path):
    torch.manual_seed(0)
    reinit_for_parity(_bart()).eval().save_pretrained(tmp_path / "base")
    src, tgt = _ids(), _ids()[:, :5]

    def reference(adapter):
        torch.manual_seed(0)
        return peft.PeftModel.from_pretrained(reinit_for_parity(_bart()).eval(), adapter).eval()

    def logits(model, hf=False):
        with torch.no_grad():
            return (model(input_ids=src, decoder_input_ids=tgt) if hf else model(src, decoder_input_ids=tgt)).logits

    model = add_lora(fk.from_pretrained(tmp_path / "base"), r=2, alpha=4, target_modules=["cross_k", "cross_out", "v"])
    _randomize(lora_parameters(model))
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    assert sorted(config["target_modules"]) == ["encoder_attn.k_proj", "encoder_attn.out_proj", "self_attn.v_proj"]
    assert parity_error(logits(model), logits(reference(tmp_path / "ours"), hf=True)) < TOL

    torch.manual_seed(0)
    theirs = peft.get_peft_model(reinit_for_parity(_bart()).eval(), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["encoder_attn.q_proj", "encoder_attn.v_proj", "fc2"])).eval()
    _randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=5)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(fk.from_pretrained(tmp_path / "base"), tmp_path / "theirs")
    assert parity_error(logits(loaded), logits(theirs, hf=True)) < TOL
    assert parity_error(logits(fk.from_pretrained(tmp_path / "base")), logits(theirs, hf=True)) > 100 * TOL


def test_vit_adapters_are_refused_in_peft_format(tmp_path):
    cfg = fk.ModelConfig.from_preset("vit-digits", n_layers=1, d_model=32, n_heads=4, d_ff=48, num_labels=3)
    model = add_lora(fk.Transformer(cfg), r=2, alpha=4, target_modules="all-linear")
    with pytest.raises(InputError, match="transformers renames their modules on load"):
        save_adapter(model, tmp_path)


def _plain_copy(model, cfg):
    """A plain model holding ``model``'s base weights."""
    plain = fk.Transformer(cfg)
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "adapters." not in k}
    plain.load_state_dict(state)
    return plain
