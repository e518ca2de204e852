"""Mixture of experts: Mixtral and Qwen2-MoE parity with transformers both ways (logits, aux loss, greedy ids),
the grouped expert computation = a per-token loop, capacity dropping = a brute-force recomputation, the router
losses in closed form and in the training loss, hooks, save/load, cached = recomputed, and refusals."""

from __future__ import annotations

import math
import os

import pytest
import torch

import formerkit as fk
from conftest import PARITY_TOL, load_script, parity_error, reinit_for_parity, require
from formerkit.cache import KVCache
from formerkit.errors import ConfigError
from formerkit.layers.moe import MoE, router_losses
from formerkit.train import train
from formerkit.train.config import TrainConfig
from formerkit.train.logging import read_metrics
from formerkit.train.objectives import with_router_losses
from formerkit.train.parallel import Wrapped

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = require("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96
BASE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
            max_position_embeddings=64, num_experts_per_tok=2)
SMALL = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64, max_seq_len=32,
             n_experts=4, experts_per_token=2)


def _mixtral():
    cfg = transformers.MixtralConfig(**BASE, intermediate_size=40, num_hidden_layers=2, num_local_experts=4,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe():  # a dense first layer, raw top-k weights, a shared expert
    cfg = transformers.Qwen2MoeConfig(**BASE, intermediate_size=48, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=40, num_hidden_layers=3, num_experts=6,
                                      mlp_only_layers=[0], norm_topk_prob=False)
    return transformers.Qwen2MoeForCausalLM(cfg)


REFERENCES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe}


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def pair(request, tmp_path_factory, one_thread):
    """(name, transformers model, formerkit model loaded from its save_pretrained dir), both in eval mode."""
    torch.manual_seed(0)
    reference = reinit_for_parity(REFERENCES[request.param]()).eval()
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return request.param, reference, fk.from_pretrained(path).eval()


def _ids_and_mask():
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def test_loads_the_families_layout(pair):
    name, _, model = pair
    sparse = [isinstance(block.mlp, MoE) for block in model.blocks]
    assert sparse == ([True, True] if name == "mixtral" else [False, True, True])
    moe = model.blocks[-1].mlp
    assert moe.renormalize == (name == "mixtral") and (moe.shared is not None) == (name == "qwen2_moe")


def test_logits_equal_transformers_both_ways(pair, tmp_path):
    name, reference, model = pair
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        expected = reference(ids).logits
        assert parity_error(model(ids).logits, expected) < PARITY_TOL
        padded = reference(ids, attention_mask=mask).logits
        assert parity_error(model(ids, attention_mask=mask).logits, padded, mask.bool()) < PARITY_TOL
    fk.save_pretrained(model, tmp_path, format="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(reference)
    with torch.no_grad():
        assert parity_error(back(ids).logits, expected) < PARITY_TOL


def test_aux_loss_equals_transformers(pair):
    _, reference, model = pair
    ids, mask = _ids_and_mask()
    for attention_mask in (None, mask):
        with torch.no_grad():
            out = reference(ids, attention_mask=attention_mask, output_router_logits=True)
            model(ids, attention_mask=attention_mask)
        balance, _ = router_losses(model, attention_mask)
        assert abs(float(balance) - float(out.aux_loss)) < 1e-5


def test_greedy_equals_transformers(pair):
    _, reference, model = pair
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = reference.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(fk.generate(model, ids, max_new_tokens=12, eos_token_id=[]), expected)


def test_a_swapped_activation_is_caught(pair):
    """The parity comparison can fail: GELU experts instead of SiLU."""
    _, reference, model = pair
    ids, _ = _ids_and_mask()
    moes = [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]
    acts = [m.act for m in moes]
    try:
        for m in moes:
            m.act = torch.nn.functional.gelu
        with torch.no_grad():
            assert parity_error(model(ids).logits, reference(ids).logits) > 100 * PARITY_TOL
    finally:
        for m, act in zip(moes, acts, strict=True):
            m.act = act


def _moe(gated=True, renormalize=True, shared=0, capacity=None, seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(16, 12, 5, 2, activation="silu" if gated else "gelu", gated=gated, renormalize=renormalize,
              shared_d_ff=shared, capacity_factor=capacity, init_std=0.3, out_std=0.3)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    return moe


def _naive(moe: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """A per-token, per-expert loop over the MoE's weights; ``keep[(token, expert)]`` False drops a pair."""
    E, F = moe.n_experts, moe.d_ff
    w_in = moe.w_in.view(E, -1, moe.d_model)
    w_out = moe.w_out.view(E, moe.d_model, F)
    rows = []
    for n, token in enumerate(x.reshape(-1, moe.d_model)):
        probs = (moe.router.weight @ token).softmax(-1)
        top, chosen = probs.topk(moe.top_k)
        if moe.renormalize:
            top = top / top.sum()
        out = torch.zeros_like(token)
        for weight, e in zip(top, chosen.tolist(), strict=True):
            if keep is not None and not keep[(n, e)]:
                continue
            hidden = w_in[e] @ token
            hidden = moe.act(hidden[:F]) * hidden[F:] if moe.gated else moe.act(hidden)
            out = out + weight * (w_out[e] @ hidden)
        if moe.shared is not None:
            out = out + torch.sigmoid(moe.shared_gate.weight @ token) * moe.shared(token[None, None])[0, 0]
        rows.append(out)
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("gated,renormalize,shared", [(True, True, 0), (False, False, 0), (True, False, 8)])
def test_grouped_and_gathered_equal_a_per_token_loop(gated, renormalize, shared):
    moe = _moe(gated, renormalize, shared)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(3))
    naive = _naive(moe, x)
    grouped = moe(x)  # 21 tokens x 2 choices > 5 experts: grouped by expert
    assert (grouped - naive).abs().max() < 1e-5
    one = moe(x[:1, :2])  # 2 tokens x 2 choices <= 5 experts: each pair gathers its expert's weights
    assert (one - naive[:1, :2]).abs().max() < 1e-5
    grads = [torch.autograd.grad(out.square().sum(), [moe.w_in, moe.w_out, moe.router.weight])
             for out in (moe(x), _naive(moe, x))]
    for ours, loop in zip(*grads, strict=True):
        assert (ours - loop).abs().max() < 1e-4 * max(1.0, float(loop.abs().max()))


def test_capacity_drops_as_a_brute_force_recomputation():
    moe = _moe(capacity=0.5).train()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(4))
    flat = x.reshape(-1, 16)
    N, k, E = flat.shape[0], moe.top_k, moe.n_experts
    capacity = math.ceil(0.5 * N * k / E)
    chosen = (flat @ moe.router.weight.t()).softmax(-1).topk(k, dim=-1).indices  # (N, k)
    taken, keep = [0] * E, {}
    for rank in range(k):  # every first choice before any second choice, then token order
        for n in range(N):
            e = int(chosen[n, rank])
            keep[(n, e)] = taken[e] < capacity
            taken[e] += 1
    assert not all(keep.values())
    expected = _naive(moe, x, keep)
    assert (moe(x) - expected).abs().max() < 1e-5
    dropped = [n for n in range(N) if not any(keep[(n, int(e))] for e in chosen[n])]
    with torch.no_grad():
        assert all(float(moe(x).reshape(N, -1)[n].abs().max()) == 0.0 for n in dropped)
    moe.eval()  # at inference nothing is dropped
    assert (moe(x) - _naive(moe, x)).abs().max() < 1e-5


def test_a_token_every_expert_dropped_passes_through_the_block():
    cfg = fk.ModelConfig.from_preset("llama", **{**SMALL, "capacity_factor": 0.01, "n_experts": 8})
    torch.manual_seed(0)
    model = fk.Transformer(cfg).train()
    seen = {}
    block = model.blocks[0]
    block.hook_mlp_out.register_forward_hook(lambda m, i, out: seen.setdefault("mlp", out))
    model(torch.randint(0, 64, (2, 16)))
    per_token = seen["mlp"].reshape(32, -1).abs().amax(-1)  # capacity 1 of 32 * 2 assignments over 8 experts
    assert int((per_token == 0).sum()) >= 32 - 8


def test_router_losses_closed_form_and_in_the_training_loss():
    model = fk.Transformer(fk.ModelConfig.from_preset("llama", **SMALL))
    for block in model.blocks:
        torch.nn.init.zeros_(block.mlp.router.weight)  # uniform routing
    ids = torch.randint(0, 64, (2, 8))
    ce = model(ids, labels=ids).loss
    balance, z = (loss.detach() for loss in router_losses(model))
    assert abs(float(balance) - 2.0) < 1e-6  # balanced: k
    assert abs(float(z) - math.log(4) ** 2) < 1e-5  # logsumexp of 4 zeros, squared
    expected = ce.item() + 0.1 * 2.0 + 0.01 * math.log(4) ** 2
    assert with_router_losses(ce, model, (0.1, 0.01)).item() == pytest.approx(expected)
    wrapped = Wrapped(model, None, False)  # what the trainer passes
    assert with_router_losses(ce, wrapped, (0.1, 0.01)).item() == pytest.approx(expected)
    dense = fk.Transformer(fk.ModelConfig.from_preset("llama", **{**SMALL, "n_experts": 0}))
    loss = dense(ids, labels=ids).loss
    assert with_router_losses(loss, dense, (0.1, 0.01)) is loss


def test_balance_loss_moves_the_router():
    model = fk.Transformer(fk.ModelConfig.from_preset("llama", **SMALL))
    model(torch.randint(0, 64, (2, 8)))
    balance, z = router_losses(model)
    (balance + z).backward()
    assert all(float(b.mlp.router.weight.grad.abs().max()) > 0 for b in model.blocks)


def test_hooks_fire_and_steer():
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("llama", **{**SMALL, "shared_expert_d_ff": 16})).eval()
    names = ["blocks.1.mlp.hook_router_logits", "blocks.1.mlp.hook_router_weights", "blocks.1.mlp.hook_expert_out",
             "blocks.1.mlp.shared.hook_pre", "blocks.1.mlp.shared.hook_post", "blocks.1.hook_mlp_out"]
    seen = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, out, n=n: seen.__setitem__(n, out)) for n in names]
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
    assert set(seen) == set(names)
    assert seen[names[0]].shape == (2, 6, 4) and seen[names[1]].shape == (2, 6, 4)
    assert torch.equal((seen[names[1]] > 0).sum(-1), torch.full((2, 6), 2))  # k experts per token
    for h in handles:
        h.remove()
    moe = model.blocks[1].mlp
    handles = [moe.hook_router_weights.register_forward_hook(lambda m, i, out: torch.zeros_like(out)),
               moe.hook_expert_out.register_forward_hook(lambda m, i, out: seen.__setitem__("experts", out))]
    with torch.no_grad():
        ablated = model(ids).logits
    for h in handles:
        h.remove()
    assert float(seen["experts"].abs().max()) == 0.0 and not torch.allclose(ablated, base)


def test_native_round_trip_and_cached_equals_recomputed(tmp_path):
    cfg = fk.ModelConfig.from_preset("llama", **{**SMALL, "n_layers": 3, "moe_layer_step": 2, "shared_expert_d_ff": 8,
                                                 "moe_renormalize": False, "capacity_factor": 1.0})
    torch.manual_seed(0)
    model = fk.Transformer(cfg).eval()
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, False]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    fk.save_pretrained(model, tmp_path)
    loaded = fk.from_pretrained(tmp_path).eval()
    assert loaded.config == cfg
    with torch.no_grad():
        full = model(ids).logits
        assert torch.equal(loaded(ids).logits, full)
        cache = KVCache.for_model(model, 2, 32)
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                           for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_config_refusals():
    cases = [
        ({"experts_per_token": 5}, "experts_per_token=5 exceeds n_experts=4"),
        ({"n_experts": -1}, "n_experts must be an integer >= 0"),
        ({"capacity_factor": 0}, "capacity_factor must be a positive number"),
        ({"moe_dense_layers": [0, 2]}, "moe_dense_layers names layer 2"),
        ({"moe_dense_layers": [0, 1]}, "no layer is sparse"),
        ({"moe_layer_step": 3}, "no layer is sparse"),
        ({"moe_d_ff": 0}, "moe_d_ff must be a positive integer or null"),
        ({"shared_expert_d_ff": -2}, "shared_expert_d_ff must be an integer >= 0"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            fk.ModelConfig.from_preset("llama", **{**SMALL, **change})
    for coef in (-0.1, float("nan")):
        with pytest.raises(ConfigError, match="train.router_aux_loss_coef must be a finite number >= 0"):
            TrainConfig.from_dict({"train": {"router_aux_loss_coef": coef}})


def test_hf_export_refusals(tmp_path):
    learned = fk.Transformer(fk.ModelConfig.from_preset("gpt2", **{**SMALL, "n_kv_heads": None}))
    with pytest.raises(ConfigError, match="mixtral or qwen2_moe.*position='learned'"):
        fk.save_pretrained(learned, tmp_path, format="hf")
    no_shared = fk.Transformer(fk.ModelConfig.from_preset("llama", **{**SMALL, "qkv_bias": True,
                                                                      "out_bias": False}))
    with pytest.raises(ConfigError, match="qwen2_moe.*shared_expert_d_ff=0"):
        fk.save_pretrained(no_shared, tmp_path, format="hf")


@pytest.mark.slow
def test_the_training_benchmark_runs(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n\n" * 300)
    bench = load_script("benchmarks/moe_train.py")
    rows = bench.main(["--quick", "--steps", "12", "--evals", "2", "--source", str(tmp_path / "text.txt"),
                       "--tokenizer", "byte", "--seq-len", "16", "--batch", "2", "--threads", "1"])
    dense, moe = rows
    assert dense["total"] == dense["active"] and moe["total"] > 2 * moe["active"]
    assert abs(moe["active"] - dense["active"]) < 0.05 * dense["active"]  # equal active size, the routers aside
    assert [step for step, _, _ in moe["evals"]] == [6, 12] and all(math.isfinite(v) for _, _, v in moe["evals"])
    assert "| moe 8x top-2 |" in capsys.readouterr().out
    timed = bench.main(["--quick", "--timing-rounds", "2", "--vocab", "64", "--seq-len", "8", "--batch", "2"])
    assert [r["name"] for r in timed] == ["dense", "moe 8x top-2"] and all(r["per_step"] > 0 for r in timed)


@pytest.mark.slow
def test_training_resumes_bit_exactly(tmp_path):
    """A MoE run (router losses in its loss, tokens dropped at capacity) resumed from its middle checkpoint
    reaches the same losses bit for bit."""
    (tmp_path / "text.txt").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(400)))

    def run(resume) -> dict[int, tuple[float, float]]:
        train(TrainConfig.from_dict({
            "model": {**{k: v for k, v in SMALL.items() if k != "vocab_size"}, "preset": "llama",
                      "capacity_factor": 1.0, "shared_expert_d_ff": 8},
            "data": {"source": str(tmp_path / "text.txt"), "tokenizer": "byte", "cache_dir": str(tmp_path / "c")},
            "train": {"steps": 8, "batch_size": 4, "seq_len": 16, "precision": "fp32", "attention": "sdpa",
                      "threads": 1},
            "optim": {"warmup_steps": 2, "kernel": "foreach"},
            "eval": {"every": 8, "batches": 1},
            "checkpoint": {"run_dir": str(tmp_path / "run"), "every": 4, "resume": resume},
            "log": {"every": 1, "progress": False, "tensorboard": False, "samples": 0},
        }))
        return {r["step"]: (r["loss"], r["time"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                if r["split"] == "train"}

    straight = run(True)
    resumed = run("step-0000004")
    assert sorted(resumed) == list(range(1, 9))
    assert all(resumed[s][1] > straight[8][1] for s in range(5, 9))  # steps 5-8 ran again
    assert {s: loss for s, (loss, _) in resumed.items()} == {s: loss for s, (loss, _) in straight.items()}
