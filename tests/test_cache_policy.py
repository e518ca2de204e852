"""KV-cache eviction policies against a brute-force recomputation, fixed memory, and bad input.

The reference (``_reference``) recomputes the whole sequence at every step without a cache and
keeps, per layer, a plain list of the tokens the policy keeps, restated here in a few lines of
Python: each query attends only to the tokens kept when it was fed (a mask on
``hook_attn_scores``), and, where the sinks policy re-indexes positions, its scores are recomputed
pairwise from the unrotated q and k (``hook_q``/``hook_k``) with each key at its index in the
cache at that query's time (RoPE rotation, or ALiBi's distance).
"""

from __future__ import annotations

import argparse

import pytest
import torch

import formerkit as fk
from conftest import load_script
from formerkit.cache import KVCache
from formerkit.errors import InputError
from formerkit.generate.cache_policy import CachePolicy, parse_cache_policy
from formerkit.generate.command import add_generate_command, config_from_args
from formerkit.generate.decode import stream
from formerkit.generate.eviction import policy_logits
from formerkit.generate.jacobi import jacobi_generate
from formerkit.generate.speculative import speculative_generate
from formerkit.layers.hooks import HookPoint
from formerkit.layers.position import alibi_bias, apply_rotary

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=64, tie_embeddings=False)
MODELS = {"rope-gqa": ("llama", {"n_kv_heads": 2}), "alibi": ("gpt2", {"position": "alibi"}),
          "learned": ("gpt2", {}), "nope": ("gpt2", {"position": "none"})}


def _model(name: str, **kw) -> fk.Transformer:
    preset, overrides = MODELS[name]
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **overrides, **kw})).eval()


def _evict(kept: list[int], policy: CachePolicy, received: torch.Tensor, current: torch.Tensor) -> list[int]:
    """The policy restated on a list of token indices: what stays of ``kept`` (which holds the newest token)."""
    room = policy.budget - 1
    if len(kept) <= room:
        return kept

    def best(candidates: list[int], score: torch.Tensor, n: int) -> list[int]:
        return sorted(candidates, key=lambda j: (-float(score[j]), j))[:n]  # ties: the earlier token

    if policy.kind == "sliding":
        return kept[len(kept) - room:]
    if policy.kind == "sinks":
        return kept[:policy.sinks] + kept[len(kept) - (room - policy.sinks):] if room > policy.sinks else kept[:room]
    if policy.kind == "h2o":
        recent = kept[len(kept) - (policy.recent - 1):] if policy.recent > 1 else []
        rest = [j for j in kept if j not in recent]
        return sorted(best(rest, received, room - len(recent)) + recent)
    return sorted(best(kept, current, room))  # tova


@torch.no_grad()
def _reference(model: fk.Transformer, ids: torch.Tensor, policy: CachePolicy, prompt: int) -> torch.Tensor:
    """Logits (N, V) of ids (1, N): the first ``prompt`` tokens at once, then one per step, by full recomputation."""
    N, L = ids.shape[1], model.config.n_layers
    reindex = policy.kind == "sinks" and model.config.position in ("rope", "alibi")
    visible = torch.zeros(L, N, N, dtype=torch.bool)  # query i sees key j in layer l
    key_pos = torch.arange(N).repeat(L, N, 1)  # (L, N, N): the position of key j as query i saw it
    query_pos = torch.arange(N)  # (N,)
    received = torch.zeros(L, N)
    kept = [list(range(prompt)) for _ in range(L)]
    for i in range(prompt):
        visible[:, i, :i + 1] = True
    out = []
    for t in range(prompt - 1, N):
        if t >= prompt:
            for l in range(L):
                kept[l] = kept[l] + [t]
                visible[l, t, kept[l]] = True
                if reindex:
                    key_pos[l, t, kept[l]] = torch.arange(len(kept[l]))
            query_pos[t] = len(kept[0]) - 1 if reindex else t
        logits, patterns = _masked_forward(model, ids[:, :t + 1], visible, key_pos, query_pos, reindex)
        rows = slice(0, prompt) if t == prompt - 1 else slice(t, t + 1)
        out.append(logits[rows])
        for l in range(L):
            received[l, :t + 1] += patterns[l][:, rows].sum((0, 1))
            kept[l] = _evict(kept[l], policy, received[l], patterns[l][:, t].mean(0))
    return torch.cat(out)


def _masked_forward(model, ids, visible, key_pos, query_pos, reindex):
    """One uncached forward under the per-layer masks; returns logits (T, V) and each layer's pattern (H, T, T)."""
    T = ids.shape[1]
    captured: dict[int, dict[str, torch.Tensor]] = {}
    patterns = []
    handles = []
    for l, block in enumerate(model.blocks):
        attn = block.attn
        captured[l] = {}
        handles.append(attn.hook_q.register_forward_hook(lambda m, i, o, l=l: captured[l].__setitem__("q", o)))
        handles.append(attn.hook_k.register_forward_hook(lambda m, i, o, l=l: captured[l].__setitem__("k", o)))

        def scores_hook(module, inputs, scores, l=l, attn=attn):
            if reindex:
                scores = _pairwise_scores(model, attn, captured[l]["q"], captured[l]["k"], query_pos[:T],
                                          key_pos[l, :T, :T])
            return scores.masked_fill(~visible[l, :T, :T], torch.finfo(scores.dtype).min)

        handles.append(attn.hook_attn_scores.register_forward_hook(scores_hook))
        handles.append(attn.hook_pattern.register_forward_hook(lambda m, i, o: patterns.append(o[0].float())))
    try:
        logits = model(ids).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, patterns


def _pairwise_scores(model, attn, q, k, query_pos, key_pos) -> torch.Tensor:
    """Scores (1, H, T, T) with query i at query_pos[i] and key j at key_pos[i, j] (RoPE or ALiBi)."""
    T, H = q.shape[1], attn.n_heads
    group = H // attn.n_kv_heads
    rows = []
    for i in range(T):
        qi, ki = q[:, i:i + 1], k  # (1, 1, H, D), (1, T, KV, D)
        if model.rotary is not None:
            qi = apply_rotary(qi, *model.rotary(query_pos[i:i + 1][None]))
            ki = apply_rotary(ki, *model.rotary(key_pos[i][None]))
        ki = ki.repeat_interleave(group, dim=2)  # (1, T, H, D)
        row = torch.einsum("bhd,bthd->bht", qi[:, 0].float(), ki.float()) * attn.scale  # (1, H, T)
        if model.alibi_slopes is not None:
            row = row + alibi_bias(model.alibi_slopes, query_pos[i:i + 1][None], key_pos[i][None])[:, :, 0]
        rows.append(row)
    return torch.stack(rows, dim=2)  # (1, H, T, T)


CASES = [("rope-gqa", "sliding:6"), ("rope-gqa", "sinks:7:2"), ("rope-gqa", "h2o:7:3"), ("rope-gqa", "tova:6"),
         ("alibi", "sinks:6:2"), ("alibi", "sliding:5"), ("learned", "h2o:5:1"), ("nope", "sinks:5:1")]


@pytest.mark.parametrize("prompt", [1, 9])
@pytest.mark.parametrize("name,spec", CASES)
def test_policy_matches_recomputation_with_the_kept_tokens(name, spec, prompt):
    model, policy = _model(name), parse_cache_policy(spec)
    ids = torch.randint(0, 64, (1, 18), generator=torch.Generator().manual_seed(1))
    got = policy_logits(model, ids, policy, prompt=prompt)[0]
    want = _reference(model, ids, policy, prompt)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - model(ids).logits[0]).abs().max() > 1e-3  # the budget binds: eviction changed the logits


@pytest.mark.parametrize("spec", ["sliding:6", "sinks:7:2", "h2o:7:3", "tova:6"])
def test_generate_follows_the_policy_and_padded_rows_generate_as_alone(spec):
    model = _model("rope-gqa")
    rows = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    batched = fk.generate(model, rows, max_new_tokens=14, cache_policy=spec)
    for r, row in enumerate(rows):
        alone = fk.generate(model, [row], max_new_tokens=14, cache_policy=spec)[0]
        assert batched[r, -len(alone):].tolist() == alone.tolist()
        forced = policy_logits(model, alone[None, :-1], parse_cache_policy(spec), prompt=len(row))[0]
        assert forced[len(row) - 1:].argmax(-1).tolist() == alone[len(row):].tolist()


def test_full_policy_and_a_budget_that_never_binds_generate_as_today():
    model = _model("rope-gqa")
    rows = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    today = fk.generate(model, rows, max_new_tokens=12)
    assert torch.equal(fk.generate(model, rows, max_new_tokens=12, cache_policy="full"), today)
    for spec in ["sliding:21", "sinks:21", "h2o:30", "tova:21"]:  # 9 + 12 = 21 keys at most
        assert torch.equal(fk.generate(model, rows, max_new_tokens=12, cache_policy=spec), today), spec
    ids = torch.tensor([rows[1]])
    torch.testing.assert_close(policy_logits(model, ids, CachePolicy()), model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match=r"prompt .* must be an integer in \[1, 9\], got 10"):
        policy_logits(model, ids, CachePolicy(), prompt=10)


@pytest.mark.parametrize("spec", ["sliding:8", "sinks:8", "h2o:8", "tova:8"])
def test_memory_stays_at_the_budget_past_max_seq_len(spec, monkeypatch):
    model = _model("rope-gqa", max_seq_len=16)
    caches = []
    allocate = KVCache.for_model.__func__

    def recording(cls, *args, **kwargs):
        caches.append(allocate(cls, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(KVCache, "for_model", classmethod(recording))
    out = fk.generate(model, [[1, 2, 3, 4]], max_new_tokens=40, cache_policy=spec)
    assert out.shape == (1, 44)  # past max_seq_len=16: RoPE has no limit
    assert len(caches) == 1 and all(layer.k.shape[2] == 8 for layer in caches[0].layers)
    assert caches[0].length == 7
    assert not any(m.active for m in model.modules() if isinstance(m, HookPoint))  # hooks lived per pass only


def test_learned_positions_still_stop_at_max_seq_len():
    model = _model("learned", max_seq_len=16)
    with pytest.raises(InputError, match="max_seq_len=16"):
        fk.generate(model, [[1, 2, 3, 4]], max_new_tokens=40, cache_policy="sliding:8")


def test_a_paused_stream_leaves_no_hooks():
    model = _model("rope-gqa")
    tokens = stream(model, [[1, 2, 3]], max_new_tokens=10, cache_policy="tova:4")
    next(tokens)
    next(tokens)
    assert not any(m.active for m in model.modules() if isinstance(m, HookPoint))


@pytest.mark.parametrize("spec,message", [
    ("h20:8", 'did you mean "h2o"'),
    ("sinks:4:4", r"budget \(4\) must exceed the sink count \(4\)"),
    ("sinks:3", r"budget \(3\) must exceed the sink count \(4\)"),
    ("full:8", "takes no budget"),
    ("sliding", "needs a budget"),
    ("tova:x", "'x' is not an integer"),
    ("tova:0", "budget .* must be an integer >= 1"),
    ("h2o:8:9", r"recent window \(9\) cannot exceed the budget \(8\)"),
    ("sliding:8:2", "write it as sliding:BUDGET"),
])
def test_bad_policies_are_refused_naming_the_fix(spec, message):
    with pytest.raises(InputError, match=message):
        fk.GenerationConfig(cache_policy=spec)


def test_policies_a_model_or_decoder_cannot_run_are_refused():
    with pytest.raises(InputError, match="num_beams=2.*cache_policy='h2o:8:4'"):
        fk.GenerationConfig(num_beams=2, cache_policy="h2o:8")
    with pytest.raises(InputError, match="keeps different tokens in each layer.*alibi"):
        fk.generate(_model("alibi"), [[1, 2]], max_new_tokens=3, cache_policy="tova:8")
    with pytest.raises(InputError, match="use cache_policy 'sliding:4'"):
        fk.generate(_model("rope-gqa", sliding_window=4), [[1, 2]], max_new_tokens=3, cache_policy="sinks:8")
    seq2seq = fk.Transformer(fk.ModelConfig.from_preset("t5-small", n_layers=1, d_model=32, n_heads=4, d_ff=48,
                                                        vocab_size=64, max_seq_len=32))
    with pytest.raises(InputError, match="decoder-only"):
        fk.generate(seq2seq, [[1, 2]], max_new_tokens=3, cache_policy="sliding:8")
    model = _model("rope-gqa")
    with pytest.raises(InputError, match="cache_policy"):
        jacobi_generate(model, [[1, 2]], max_new_tokens=3, cache_policy="sliding:8")
    with pytest.raises(InputError, match="cache_policy"):
        speculative_generate(model, model, [[1, 2]], max_new_tokens=3, cache_policy="sliding:8")
    # a model that can: sliding eviction within its own window
    assert fk.generate(_model("rope-gqa", sliding_window=4), [[1, 2]], max_new_tokens=9,
                       cache_policy="sliding:4").shape == (1, 11)


def test_command_line_option():
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers())
    args = parser.parse_args(["generate", "--checkpoint", "x", "--cache-policy", "sinks:64:2"])
    assert config_from_args(args).cache_policy == CachePolicy("sinks", 64, sinks=2)
    args = parser.parse_args(["generate", "--checkpoint", "x", "--cache-policy", "tova"])
    with pytest.raises(InputError, match="needs a budget"):
        config_from_args(args)


@pytest.mark.slow
def test_curve_benchmark_runs_on_a_tiny_model(tmp_path, capsys):
    bench = load_script("benchmarks/cache_policy.py")
    out = bench.main(["--quick", "--steps-train", "3", "--out", str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert "| 16 (1/2) |" in capsys.readouterr().out
    for kind, rows in out["results"].items():
        assert [r["budget"] for r in rows] == [16, 8], kind
        assert all(r["ppl"] > 1 and r["ppl_last"] > 1 for r in rows)
