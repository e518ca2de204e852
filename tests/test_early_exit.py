"""Early exit (ModelConfig.exit_layers): exits trained jointly, confidence-threshold decoding with a consistent
KV cache, each checked against a brute-force recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import formerkit as fk
from formerkit.cache import KVCache
from formerkit.generate import early_exit_generate
from formerkit.train import train
from test_train import config, losses

SMALL = dict(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64, max_seq_len=64)


def _model(**kw) -> fk.Transformer:
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset("llama", **{**SMALL, "exit_layers": [0, 2], **kw})).eval()


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def test_exit_logits_while_training_are_each_exit_head_on_its_layer_output():
    model = _model(exit_head="separate").train()
    ids = _ids(2, 9)
    out = model(ids)
    _, cache = fk.run_with_cache(model.eval(), ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    for index, layer in enumerate([0, 2]):
        stream = cache[f"blocks.{layer}.hook_resid_post"]
        expected = model.exits.projs[index](model.exits.norms[index](stream))
        torch.testing.assert_close(out.exit_logits[index], expected)
    assert model(ids).exit_logits is None  # eval without labels: no exit heads run
    assert len(model(ids, labels=ids).exit_logits) == 2


def test_a_threshold_above_one_is_plain_greedy_decoding():
    model, ids = _model(), _ids(2, 7)
    out = early_exit_generate(model, ids, threshold=1.5, max_new_tokens=10)
    assert torch.equal(out.sequences, fk.generate(model, ids, max_new_tokens=10))
    assert out.layers_used == [4] * 9 and out.mean_layers == 4


def test_a_zero_threshold_decodes_with_the_first_exit():
    """Every step leaves at block 0, whose later blocks never feed a prediction again: the tokens after the
    first (predicted by the prompt's full pass) are greedy decoding of block 0 read by its exit head."""
    model, prompt = _model(), _ids(1, 6)
    out = early_exit_generate(model, prompt, threshold=0.0, max_new_tokens=8)
    assert out.layers_used == [1] * 7
    ids = fk.generate(model, prompt, max_new_tokens=1)
    with torch.no_grad():
        for _ in range(7):
            _, cache = fk.run_with_cache(model, ids, names_filter="blocks.0.hook_resid_post")
            logits = model.exits(0, cache["blocks.0.hook_resid_post"][:, -1:], model.lm_head)
            ids = torch.cat([ids, logits.argmax(-1)], dim=1)
    assert torch.equal(out.sequences, ids)


def test_skipped_layers_cache_the_exit_state():
    """A step that exits after block 0 leaves keys and values in blocks 1-3 as if each had read block 0's
    output at that position: the next full step equals a recomputation with that stream fed to them."""
    model, ids = _model(), _ids(1, 8)
    with torch.no_grad():
        cache = KVCache.for_model(model, 1, 16)
        model(ids[:, :6], cache=cache)
        positions = torch.tensor([[6]])
        _, layers = model.decode_with_exits(ids[:, 6:7], positions, cache, threshold=0.0)
        assert layers == 1
        stepped, layers = model.decode_with_exits(ids[:, 7:8], positions + 1, cache, threshold=2.0)
        assert layers == 4
    seen = {}

    def keep(x, hook):
        seen["exit"] = x[:, 6].clone()

    def replace(x, hook):
        x = x.clone()
        x[:, 6] = seen["exit"]
        return x

    hooks = [("blocks.0.hook_resid_post", keep)] + [(f"blocks.{j}.hook_resid_pre", replace) for j in (1, 2, 3)]
    with torch.no_grad():
        recomputed = fk.run_with_hooks(model, ids, fwd_hooks=hooks)
    torch.testing.assert_close(stepped[:, -1], recomputed[:, -1], atol=1e-5, rtol=1e-5)


def test_a_batch_exits_only_when_every_row_is_sure():
    model, ids = _model(), _ids(2, 6)
    with torch.no_grad():
        _, cache = fk.run_with_cache(model, ids, names_filter="blocks.0.hook_resid_post")
        confidence = model.exits(0, cache["blocks.0.hook_resid_post"][:, -1], model.lm_head).softmax(-1).amax(-1)
    assert confidence[0] != confidence[1]
    threshold = float(confidence.mean())  # one row is sure enough at the first exit, the other is not

    def layers_used(rows: slice) -> int:
        with torch.no_grad():
            kv = KVCache.for_model(model, rows.stop - rows.start, 16)
            model(ids[rows, :5], cache=kv)
            return model.decode_with_exits(ids[rows, 5:6], torch.full((rows.stop - rows.start, 1), 5), kv,
                                           threshold)[1]

    alone = [layers_used(slice(0, 1)), layers_used(slice(1, 2))]
    assert min(alone) == 1 and layers_used(slice(0, 2)) == max(alone) > 1


@pytest.mark.slow
def test_exits_train_jointly(tmp_path):
    train(config(tmp_path, "--model.exit_layers", "[0]", steps=30))
    assert losses(tmp_path / "run")[30] < 0.7 * losses(tmp_path / "run")[1]
    model = fk.from_pretrained(tmp_path / "run")
    ids = torch.tensor([list(b"def function_3_4(x):\n    return x * 4 + 3\n")])
    with torch.no_grad():
        out = model(ids, labels=ids)
    exit_loss = F.cross_entropy(out.exit_logits[0][0, :-1], ids[0, 1:])
    assert exit_loss < 0.7 * torch.log(torch.tensor(259.0))  # the exit learned to predict too


@pytest.mark.parametrize("head", ["shared", "separate"])
def test_exits_round_trip_natively_and_refuse_the_hf_layout(head, tmp_path):
    model = _model(exit_head=head)
    assert (model.exits.projs is None) == (head == "shared")
    fk.save_pretrained(model, tmp_path / "native")
    again = fk.from_pretrained(tmp_path / "native").eval()
    ids = _ids(1, 6)
    assert torch.equal(again(ids, labels=ids).exit_logits[1], model(ids, labels=ids).exit_logits[1])
    with pytest.raises(fk.ConfigError, match="no Hugging Face layout"):
        fk.save_pretrained(model, tmp_path / "hf", format="hf")


@pytest.mark.parametrize("kw, message", [
    (dict(exit_layers=[3]), "n_layers - 2 = 2"),
    (dict(exit_layers=[2, 0]), "increasing"),
    (dict(exit_layers=[]), "non-empty"),
    (dict(exit_head="both"), "exit_head"),
])
def test_bad_exit_configs_say_what_to_change(kw, message):
    with pytest.raises(fk.ConfigError, match=message):
        fk.ModelConfig.from_preset("llama", **{**SMALL, "exit_layers": [0], **kw})


def test_early_exit_on_an_encoder_is_refused():
    with pytest.raises(fk.ConfigError, match="decoder with head='lm'"):
        fk.ModelConfig.from_preset("bert-base", n_layers=3, exit_layers=[0])


def test_early_exit_decoding_refuses_what_it_cannot_do():
    with pytest.raises(fk.InputError, match="exit heads"):
        early_exit_generate(fk.Transformer(fk.ModelConfig.from_preset("llama", **SMALL)), _ids(1, 3))
    with pytest.raises(fk.InputError, match="sampling"):
        early_exit_generate(_model(), _ids(1, 3), temperature=0.8)
    with pytest.raises(fk.InputError, match="cache_policy"):
        early_exit_generate(_model(), _ids(1, 3), cache_policy="sliding:8")
    with pytest.raises(fk.InputError, match="threshold"):
        early_exit_generate(_model(), _ids(1, 3), threshold=-0.1)
