"""The continuous-batching engine: every request's tokens equal generating it alone, whatever shares the batch."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from formerkit.errors import InputError
from formerkit.generate.decode import generate
from formerkit.serve import ContextLengthError, Engine, QueueFullError, SamplingParams
from formerkit.serve import engine as engine_module
from formerkit.serve.prefill import prefill_groups
from formerkit.serve.slots import shift_window

SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=64, tie_embeddings=False)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [3],
           [20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37, 38], [1, 2], [60, 61, 62, 59, 58]]
MAX_TOKENS = [12, 20, 7, 25, 3, 16, 30, 9]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy CPU


def _decoder(preset: str = "llama", **kw) -> fk.Transformer:
    torch.manual_seed(0)
    options = {"n_kv_heads": 2} if preset == "llama" else {}
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **options, **kw})).eval()


def _alone(model: fk.Transformer, prompt: list[int], max_tokens: int, **options) -> list[int]:
    """The new tokens of ``fk.generate`` on this prompt alone (generation stops at EOS, then pads)."""
    ids = generate(model, [prompt], max_new_tokens=max_tokens, **options)[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


def _staggered(engine: Engine, params: list[SamplingParams], prompts: list[list[int]] = PROMPTS) -> list:
    """Submit the prompts a few at a time, stepping the engine in between, and run until all are done."""
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        requests.append(engine.submit(prompt, p))
        for _ in range(i % 3 * 2):  # 0, 2 or 4 steps before the next arrival
            engine.step()
    engine.run_until_idle()
    return requests


@pytest.mark.parametrize("preset,extra", [("llama", {}), ("gpt2", {}), ("gpt2", {"position": "alibi"}),
                                          ("llama", {"eos_token_id": 27})])
def test_greedy_equals_generating_alone_under_staggered_arrivals(preset, extra, monkeypatch):
    model = _decoder(preset, **extra)
    shifts = []
    monkeypatch.setattr(engine_module, "shift_window",
                        lambda cache, keep: (shifts.append(keep - cache.length), shift_window(cache, keep)))
    # 3 rows for 8 requests, and a cache of 2 * 32 slots: rows are reused and the window shifts both ways
    engine = Engine(model, max_batch=3, max_model_len=32)
    requests = _staggered(engine, [SamplingParams(max_tokens=m) for m in MAX_TOKENS * 2], PROMPTS * 2)
    eos = model.config.eos_token_id
    for request, prompt, m in zip(requests, PROMPTS * 2, MAX_TOKENS * 2, strict=True):
        expected = _alone(model, prompt, m)
        assert request.tokens == expected, (prompt, m)
        assert request.finish_reason == ("stop" if expected[-1] == eos else "length")
    if "eos_token_id" in extra:
        assert any(r.finish_reason == "stop" for r in requests)  # the EOS case is exercised
    else:
        assert min(shifts) < 0 < max(shifts)  # the window moved back (cache end) and forward (a longer prompt)
    assert engine.idle and all(r is None for r in engine.rows)


@pytest.mark.parametrize("preset,extra", [("llama", {}), ("gpt2", {"position": "alibi"})])
def test_prompts_admitted_in_one_step_are_prefilled_together_and_match_generating_alone(preset, extra):
    model = _decoder(preset, **extra)
    engine = Engine(model, max_batch=6, max_model_len=40)
    # two requests already decoding (their rows hold 8 and 7 tokens), then waves of arrivals of different
    # lengths, each wave admitted in one step beside them; the last wave is longer than every running row
    waves = [[([1] * 5 + [2, 3, 4], 24), ([7, 8, 9, 10, 11, 12, 13], 20)],
             [(PROMPTS[2], 9), (list(range(20, 32)), 6), (list(range(5, 16)), 11), (PROMPTS[5], 5)],
             [(list(range(10, 31)), 8), (list(range(40, 58)), 4)]]
    requests, passes = [], []
    for wave in waves:
        before = engine.metrics.prefills
        requests += [(engine.submit(p, SamplingParams(max_tokens=m)), p, m) for p, m in wave]
        engine.step()
        passes.append(engine.metrics.prefills - before)
        for _ in range(3):
            engine.step()
    engine.run_until_idle()
    assert passes == [1, 1, 1]  # each wave: one left-padded pass (lengths within the fill rule)
    for request, prompt, m in requests:
        assert request.tokens == _alone(model, prompt, m), (prompt, m)


@pytest.mark.parametrize("lengths", [[40, 3, 39, 12, 13, 1, 64, 30, 29, 31, 7], [5] * 9, [100], [9, 1]])
def test_prefill_groups_partition_the_prompts_within_the_budget_and_fill(lengths):
    groups = prefill_groups(lengths, budget=96, fill=0.75)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or (len(group) * longest <= 96
                                   and sum(lengths[i] for i in group) >= 0.75 * len(group) * longest)
    # greedy is maximal: the next prompt (longest first) did not fit in the group before it
    for first, second in zip(groups, groups[1:], strict=False):
        longest, nxt = lengths[first[0]], lengths[second[0]]
        slots = (len(first) + 1) * longest
        assert slots > 96 or sum(lengths[i] for i in first) + nxt < 0.75 * slots


def test_seeded_sampling_is_per_row_and_matches_generate_with_the_seed():
    model = _decoder()
    sampling = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    params = [SamplingParams(max_tokens=m, seed=100 + i, **sampling) for i, m in enumerate(MAX_TOKENS)]
    first = _staggered(Engine(model, max_batch=3, max_model_len=32), params)
    for request, prompt, p in zip(first, PROMPTS, params, strict=True):
        assert request.tokens == _alone(model, prompt, p.max_tokens, seed=p.seed, **sampling)
    # the same seeded request in another mix of neighbours (batch of 8, other order) draws the same tokens
    engine = Engine(model, max_batch=8, max_model_len=48)
    again = [engine.submit(prompt, p) for prompt, p in reversed(list(zip(PROMPTS, params, strict=True)))][::-1]
    engine.run_until_idle()
    assert [r.tokens for r in again] == [r.tokens for r in first]
    assert len({tuple(r.tokens) for r in first}) == len(first)  # different seeds and prompts: different draws


def test_stop_strings_cut_the_text_and_stop_sequences_end_the_request():
    model = _decoder(vocab_size=259)
    tok = fk.ByteTokenizer()
    prompt = tok.encode("hello")
    alone = _alone(model, prompt, 20)
    stop_text = tok.decode(alone[5:7])
    engine = Engine(model, tok, max_batch=2)
    by_text = engine.submit(prompt, SamplingParams(max_tokens=20, stop=(stop_text,)))
    by_ids = engine.submit(prompt, SamplingParams(max_tokens=20, stop_token_ids=(tuple(alone[3:5]),)))
    plain = engine.submit(prompt, SamplingParams(max_tokens=20))
    engine.run_until_idle()
    full = tok.decode(alone)
    assert by_text.finish_reason == "stop" and by_text.text == full[:full.index(stop_text)]
    assert by_ids.finish_reason == "stop" and by_ids.tokens == alone[:5]
    assert plain.finish_reason == "length" and plain.text == full and plain.tokens == alone


def test_outputs_stream_token_by_token_and_end_with_the_finish_reason():
    model = _decoder(vocab_size=259)
    tok = fk.ByteTokenizer()
    events = []
    engine = Engine(model, tok)
    request = engine.submit(tok.encode("abc"), SamplingParams(max_tokens=6, logprobs=2), on_output=events.append)
    engine.run_until_idle()
    assert [e.token for e in events[:-1]] == request.tokens and len(request.tokens) == 6
    assert "".join(e.text for e in events) == request.text
    assert events[-1].token is None and events[-1].finish_reason == "length"
    with torch.no_grad():  # log-probabilities of the chosen tokens, recomputed by one forward pass over the text
        ids = torch.tensor([tok.encode("abc") + request.tokens])
        logp = model(ids).logits[0, 2:-1].log_softmax(-1)  # (6, V)
    for i, event in enumerate(events[:-1]):
        assert event.logprobs.logprob == pytest.approx(float(logp[i, event.token]), abs=1e-4)
        assert [t for t, _ in event.logprobs.top] == logp[i].topk(2).indices.tolist()


def test_cancel_frees_the_row_for_the_next_request():
    model = _decoder()
    engine = Engine(model, max_batch=1)
    long = engine.submit([1, 2, 3], SamplingParams(max_tokens=40))
    nxt = engine.submit([4, 5], SamplingParams(max_tokens=5))
    engine.step()
    engine.step()
    engine.cancel(long)
    engine.run_until_idle()
    assert long.finish_reason == "cancelled" and len(long.tokens) == 3  # prefill + decode, then a decode
    assert nxt.finish_reason == "length" and nxt.tokens == _alone(model, [4, 5], 5)


def test_queue_limit_context_length_and_bad_options_are_refused():
    model = _decoder()
    engine = Engine(model, max_batch=1, max_queue=2, max_model_len=32)
    engine.submit([1], SamplingParams(max_tokens=2))
    engine.submit([1], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError, match="max_queue=2"):
        engine.submit([1], SamplingParams(max_tokens=2))
    too_long = r"maximum context length is 32.*prompt has 30 tokens.*max_tokens is 5"
    with pytest.raises(ContextLengthError, match=too_long):
        Engine(model, max_model_len=32).submit([1] * 30, SamplingParams(max_tokens=5))
    with pytest.raises(InputError, match="top_p"):
        engine.submit([1], SamplingParams(top_p=2.0))
    with pytest.raises(InputError, match=r"\[0, 64\)"):
        engine.submit([64], SamplingParams())
    engine.run_until_idle()
    with pytest.raises(InputError, match="linear-attention model"):
        Engine(_decoder(attn_type="linear"))


def test_a_request_that_fails_in_the_model_fails_alone():
    model = _decoder()

    def refuse(_module, args):  # a prompt the model cannot run (prefill: several tokens in one pass)
        if args[0].shape[1] > 1 and (args[0] == 63).any():
            raise RuntimeError("token 63 breaks this model")

    engine = Engine(model, max_batch=2)
    handle = model.tok_embed.register_forward_pre_hook(refuse)
    try:
        good = engine.submit([1, 2, 3], SamplingParams(max_tokens=8))
        bad = engine.submit([63, 1], SamplingParams(max_tokens=8))
        later = engine.submit([4, 5, 6], SamplingParams(max_tokens=4))
        engine.run_until_idle()
    finally:
        handle.remove()
    assert bad.finish_reason == "error" and "token 63" in str(bad.error)
    assert good.tokens == _alone(model, [1, 2, 3], 8) and later.tokens == _alone(model, [4, 5, 6], 4)


def test_background_thread_serves_concurrent_submissions_and_timeouts():
    model = _decoder()
    engine = Engine(model, max_batch=4)
    engine.start()
    try:
        requests = [engine.submit(p, SamplingParams(max_tokens=m))
                    for p, m in zip(PROMPTS[:5], MAX_TOKENS, strict=False)]
        late = engine.submit([9, 9], SamplingParams(max_tokens=40), timeout=0.0)
        assert all(r.wait(30) for r in [*requests, late])
    finally:
        engine.stop()
    for request, prompt, m in zip(requests, PROMPTS, MAX_TOKENS, strict=False):
        assert request.tokens == _alone(model, prompt, m)
    assert late.finish_reason == "timeout"
    text = engine.metrics.render()
    assert 'formerkit_requests_total{finish_reason="length"} 5' in text
    assert f"formerkit_generation_tokens_total {sum(len(r.tokens) for r in [*requests, late])}" in text
