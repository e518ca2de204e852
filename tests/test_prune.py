"""Structured pruning: per-layer sizes in the config, gate-gradient importance, physical head/neuron removal."""

from __future__ import annotations

import pytest
import torch
import transformers

import formerkit as fk
from formerkit.cli import main
from formerkit.compress.prune import importance, prune, prune_heads, prune_neurons
from formerkit.tokenizers import ByteTokenizer

VOCAB = 40


def tiny(preset: str = "gpt2", **kw) -> fk.Transformer:
    """A random tiny model in eval mode (4 heads of 8, d_ff 24, 3 layers)."""
    torch.manual_seed(0)
    sizes = dict(n_layers=3, d_model=32, n_heads=4, d_ff=24, vocab_size=VOCAB, max_seq_len=32)
    if preset == "gpt2":
        sizes.update(attn_dropout=0.0, resid_dropout=0.0, embed_dropout=0.0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**sizes, **kw})).eval()


def batches(n: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 10), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def logits_with_zeroed(model: fk.Transformer, ids: torch.Tensor, hook: str, zero: dict[int, list[int]]):
    """The brute-force reference: the unpruned model with those heads' z / neurons' activations set to 0."""
    handles = []
    for layer, indices in zero.items():
        point = getattr(model.blocks[layer].attn if hook == "z" else model.blocks[layer].mlp, f"hook_{hook}")

        def zeroed(module, inputs, out, indices=indices):
            out = out.clone()
            out[:, :, indices] = 0  # z (B, T, H, D): heads; post (B, T, d_ff): neurons
            return out

        handles.append(point.register_forward_hook(zeroed))
    with torch.no_grad():
        logits = model(ids).logits
    for h in handles:
        h.remove()
    return logits


def per_layer(cfg: fk.ModelConfig, name: str) -> list[int]:
    """Each layer's n_heads / kv_heads / d_ff (the config holds a list, or one integer for all)."""
    return [getattr(cfg.layer_config(i), name) for i in range(cfg.n_layers)]


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("preset, kw, heads", [
    ("gpt2", {}, {0: [1], 2: [0, 2, 3]}),
    ("llama", {"n_kv_heads": 2}, {0: [1, 3], 1: [2, 3], 2: [0, 1]}),  # one per group; whole groups
])
def test_pruning_heads_equals_zeroing_their_z(preset, kw, heads):
    model = tiny(preset, **kw)
    reference = logits_with_zeroed(model, IDS, "z", heads)
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model, heads)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, atol=1e-5, rtol=0)
    assert per_layer(model.config, "n_heads") == [4 - len(heads.get(i, [])) for i in range(3)]
    assert model.config.d_head == 8 and sum(p.numel() for p in model.parameters()) < before
    if preset == "llama":
        assert model.config.n_kv_heads == [2, 1, 1]
        assert model.blocks[0].attn.qkv.weight.shape == ((2 + 2 * 2) * 8, 32)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])  # plain and gated (SwiGLU) feed-forward
def test_pruning_neurons_equals_zeroing_their_activation(preset):
    model = tiny(preset)
    neurons = {0: [0, 5, 23], 1: list(range(20))}
    reference = logits_with_zeroed(model, IDS, "post", neurons)
    prune_neurons(model, neurons)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, atol=1e-5, rtol=0)
    assert model.config.d_ff == [21, 4, 24]


def test_pruned_model_saves_and_reloads(tmp_path):
    model = tiny("llama", n_kv_heads=2)
    full = sum(p.numel() for p in model.parameters())
    prune_neurons(prune_heads(model, {1: [0, 1]}), {2: [1, 2]})
    fk.save_pretrained(model, tmp_path)
    again = fk.from_pretrained(tmp_path).eval()
    assert again.config == model.config and again.config.n_heads == [4, 2, 4] and again.config.d_ff == [24, 24, 22]
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters()) < full
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    with pytest.raises(fk.ConfigError, match=r"per-layer sizes .*n_heads=\[4, 2, 4\].*format='native'"):
        fk.save_pretrained(model, tmp_path / "hf", format="hf")


def test_generation_with_the_kv_cache_on_a_pruned_model():
    model = prune_heads(tiny("llama", n_kv_heads=2), {0: [0, 1], 2: [1, 3]})
    prompt = IDS[:, :5]
    out = fk.generate(model, prompt, max_new_tokens=8)
    ids = prompt  # reference: greedy decoding re-running the whole sequence each step, no cache
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    cache = fk.model.KVCache.for_model(model, batch_size=1, max_len=8)
    assert [layer.k.shape[1] for layer in cache.layers] == [1, 2, 2]


@pytest.mark.parametrize("kw, message", [
    (dict(n_heads=[4, 4]), r"n_heads lists 2 sizes but n_layers=3"),
    (dict(d_ff=[8, 0, 8]), r"d_ff must be a positive integer or a list of them \(one per layer\), got 0"),
    (dict(n_heads=[4, 2, 4]), r"per-layer n_heads=\[4, 2, 4\] needs an explicit d_head"),
    (dict(n_heads=[4, 3, 4], n_kv_heads=2, d_head=8), r"layer 1: n_heads=3 is not a multiple of n_kv_heads=2"),
    (dict(n_heads=4, n_kv_heads=[2, 4, 3], d_head=8), r"layer 2: n_heads=4 is not a multiple of n_kv_heads=3"),
    (dict(n_heads=[4, 2, 4], d_head=8, position="alibi"), r"per-layer n_heads cannot be used with position='alibi'"),
    (dict(n_heads=True), r"n_heads must be a positive integer, got True"),
])
def test_per_layer_configs_validate(kw, message):
    with pytest.raises(fk.ConfigError, match=message):
        fk.ModelConfig.from_preset("gpt2", **{**dict(n_layers=3, d_model=32, n_heads=4, d_ff=24, vocab_size=VOCAB),
                                              **kw})


def test_per_layer_lists_are_refused_for_encoder_decoders_and_read_per_layer():
    with pytest.raises(fk.ConfigError, match="not an encoder-decoder"):
        fk.ModelConfig.from_preset("t5-small", n_layers=2, d_model=16, n_heads=2, d_head=8, d_ff=[8, 4])
    cfg = fk.ModelConfig.from_preset("llama", n_layers=2, d_model=16, n_heads=[2, 1], n_kv_heads=None, d_head=8,
                                     d_ff=(8, 4))
    assert cfg.d_ff == [8, 4] and fk.ModelConfig.from_json(cfg.to_json()) == cfg
    assert [(c.n_heads, c.kv_heads, c.d_ff) for c in map(cfg.layer_config, range(2))] == [(2, 2, 8), (1, 1, 4)]


def gate_loss(model: fk.Transformer, batch, hook: str, layer: int, gate: torch.Tensor) -> torch.Tensor:
    """The next-token loss, in float64, with layer ``layer``'s heads (hook 'z') or neurons ('post') times ``gate``."""
    point = model.blocks[layer].attn.hook_z if hook == "z" else model.blocks[layer].mlp.hook_post
    shape = (1, 1, -1, 1) if hook == "z" else (1, 1, -1)
    handle = point.register_forward_hook(lambda m, i, out: out * gate.view(shape))
    logits = model(batch["input_ids"]).logits.double()  # (B, T, V)
    handle.remove()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))


def test_head_importance_is_the_gate_gradient_by_finite_differences():
    model = tiny("gpt2").double()  # LayerNorm in float64 (Llama's RMSNorm rounds through float32)
    data = batches(1)  # the sum over batches is checked on neurons below
    scores = importance(model, data, neurons=False)
    assert scores.neurons is None
    eps = 1e-5
    for layer in (0, 2):
        expected = torch.zeros(4, dtype=torch.float64)
        for batch in data:
            for h in range(4):
                bump = torch.zeros(4, dtype=torch.float64)
                bump[h] = eps
                with torch.no_grad():
                    up = gate_loss(model, batch, "z", layer, 1 + bump)
                    down = gate_loss(model, batch, "z", layer, 1 - bump)
                expected[h] += ((up - down) / (2 * eps)).abs()
        torch.testing.assert_close(scores.heads[layer].double(), expected, rtol=1e-4, atol=1e-7)


def test_neuron_importance_is_activation_times_gradient():
    model = tiny("gpt2").double()
    data = batches(2)
    scores = importance(model, data, heads=False)
    for layer in range(3):
        expected = torch.zeros(24, dtype=torch.float64)
        for batch in data:
            seen = {}
            handle = model.blocks[layer].mlp.hook_post.register_forward_hook(
                lambda m, i, out, seen=seen: seen.setdefault("post", out))
            loss = model(**batch).loss
            handle.remove()
            (grad,) = torch.autograd.grad(loss, seen["post"])
            expected += (seen["post"] * grad).sum(dim=(0, 1)).abs()  # (d_ff,): sum over batch and positions
        torch.testing.assert_close(scores.neurons[layer].double(), expected, rtol=1e-7, atol=1e-10)


def test_prune_removes_the_least_important_units_to_the_kept_fraction():
    model = tiny("gpt2")
    data = batches(2)
    scores = importance(model, data, normalize=True)
    ranked = sorted((float(s), layer, h) for layer, layer_scores in enumerate(scores.heads)
                    for h, s in enumerate(layer_scores))
    lowest = {(layer, h) for _, layer, h in ranked[:6]}
    prune(model, data, heads=0.5, neurons=0.5, steps=1)
    kept = {(layer, h) for layer in range(3) for h in range(4)} - lowest
    assert sum(per_layer(model.config, "n_heads")) == 6 and sum(per_layer(model.config, "d_ff")) == 36
    assert per_layer(model.config, "n_heads") == [sum(1 for layer, _ in kept if layer == i) for i in range(3)]
    steps = prune(tiny("llama", n_kv_heads=2), data, heads=0.5, neurons=0.25, steps=3)
    assert sum(per_layer(steps.config, "n_heads")) == 6 and sum(per_layer(steps.config, "d_ff")) == 18
    assert all(h % kv == 0 for h, kv in zip(per_layer(steps.config, "n_heads"), per_layer(steps.config, "kv_heads"),
                                            strict=True))


def test_pruning_everything_is_refused():
    model = tiny("llama", n_kv_heads=2)
    with pytest.raises(fk.InputError, match="pruning all 4 heads of layer 1 would cut the layer"):
        prune_heads(model, {1: [0, 1, 2, 3]})
    with pytest.raises(fk.InputError, match="pruning all 24 neurons of layer 0"):
        prune_neurons(model, {0: range(24)})
    with pytest.raises(fk.InputError, match=r"\[0\] of layer 1 leaves key/value groups of \[1, 2\] .*equal"):
        prune_heads(model, {0: [0, 1], 1: [0]})
    assert model.blocks[0].attn.n_heads == 4 and model.config.n_heads == 4  # nothing changed
    with pytest.raises(fk.InputError, match="layer 5 does not exist"):
        prune_heads(model, {5: [0]})
    with pytest.raises(fk.InputError, match="kept fraction"):
        prune(model, batches(1), heads=0.0)
    prune(model, batches(1), heads=0.01, neurons=0.01, steps=2)  # as far as it can go: one unit per layer
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.d_ff) == (2, 1, 1)  # the same in each layer


def test_prune_command(tmp_path, capsys):
    model = tiny("gpt2", vocab_size=ByteTokenizer().vocab_size)
    fk.save_pretrained(model, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    text = tmp_path / "docs"
    text.mkdir()
    for i in range(6):
        (text / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 8)
    assert main(["prune", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--heads", "0.5",
                 "--neurons", "0.5", "--steps", "2", "--data", str(text), "--batches", "2", "--batch-size", "2",
                 "--seq-len", "16"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    pruned = fk.from_pretrained(tmp_path / "out")
    assert sum(per_layer(pruned.config, "n_heads")) == 6 and sum(per_layer(pruned.config, "d_ff")) == 36


def test_prune_curve_quick(tmp_path):
    from conftest import load_script

    bench = load_script("benchmarks/prune_curve.py")
    out = bench.main(["--quick", "--steps-train", "0", "--steps", "1", "--out", str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert set(out["results"]) == set(bench.MODES)
    for rows in out["results"].values():
        assert rows[0]["loss"] == pytest.approx(out["full_loss"])  # kept fraction 1: nothing pruned
        assert rows[1]["params"] < out["params"]


def test_uniformly_pruned_llama_is_one_integer_and_exports_to_transformers(tmp_path):
    model = prune_neurons(prune_heads(tiny("llama", n_kv_heads=2), {0: [2, 3], 1: [0, 1], 2: [2, 3]}),
                          {i: [1, 2] for i in range(3)})
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.d_head, model.config.d_ff) == (2, 1, 8, 22)
    fk.save_pretrained(model, tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_neurons_of_mixture_of_experts_layers_are_refused_clearly():
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("llama", n_layers=2, d_model=32, n_heads=4, d_ff=48,
                                                      vocab_size=64, max_seq_len=32, n_experts=4,
                                                      experts_per_token=2, moe_d_ff=16, n_kv_heads=None))
    with pytest.raises(fk.InputError, match=r"layers \[0, 1\] are mixtures of experts"):
        prune_neurons(model, {0: [1]})
    prune_heads(model, {0: [1]})  # heads still can be
    assert model.config.n_heads == [3, 4]
