"""Device-sound decoding: the per-token step reads nothing back, keeps its shapes, and CUDA agrees with the CPU.

The host-read test instruments the Python entry points of a device read (``item``, ``tolist``,
``__bool__``, ``__int__``, ...) while it runs the per-token functions directly, after prefill,
and requires zero calls. The CUDA test (skipped without a GPU) also runs them under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing CUDA call.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import formerkit as fk
from formerkit import cache as cache_module
from formerkit.generate import GenerationConfig, beam_search, generate
from formerkit.generate import beam as beam_module
from formerkit.generate import decode as decode_module
from formerkit.generate.decode import choose_next, start_state
from formerkit.generate.plan import make_plan
from formerkit.generate.steps import decode_step, inference
from formerkit.layers.position import Rotary

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=64, tie_embeddings=False)
MODELS = {
    "llama-gqa": ("llama", {"n_kv_heads": 2}),
    "gpt2": ("gpt2", {}),
    "alibi": ("gpt2", {"position": "alibi"}),
    "sliding": ("llama", {"n_kv_heads": 2, "sliding_window": 3}),
    "t5": ("t5-small", {"d_head": 8}),
}
ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # ragged: the second row is left-padded
SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, stop=[[3, 4]],
                eos_token_id=[63], seed=0)
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def _model(name: str, **kw) -> fk.Transformer:
    preset, overrides = MODELS[name]
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **overrides, **kw})).eval()


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count calls of every Tensor method that reads a value back to the host, from now until monkeypatch undoes it."""
    counts: Counter = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def _steps(model: fk.Transformer, plan, state, n: int) -> list[torch.Tensor]:
    """Run n per-token steps (choose, then one decode step) the way ``decode_loop`` does; return the tokens."""
    out = []
    with inference(model):
        for step in range(n):
            tokens, done = choose_next(plan, state, step)
            state.live = state.live & ~done
            state.logits = decode_step(model, tokens, state.positions, state.cache)
            state.positions = state.positions + 1
            out.append(tokens)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("sampling", [False, True])
def test_the_per_token_step_reads_nothing_back(name, sampling, monkeypatch):
    model = _model(name)
    config = GenerationConfig(max_new_tokens=8, **(SAMPLING if sampling else {}))
    plan = make_plan(model, ROWS, None, config)
    with inference(model):
        state = start_state(model, plan)  # prefill: a checked forward pass, once per call
    buffers = [layer.k.data_ptr() for layer in state.cache.layers]
    counts = _count_reads(monkeypatch)
    assert bool(torch.tensor(True)) and counts["__bool__"] == 1  # the instrumentation sees a read
    counts.clear()
    logits_shapes = set()
    with inference(model):
        for step in range(6):
            tokens, done = choose_next(plan, state, step)
            state.live = state.live & ~done
            state.logits = decode_step(model, tokens, state.positions, state.cache)
            state.positions = state.positions + 1
            logits_shapes.add(tuple(state.logits.shape))
    monkeypatch.undo()
    assert counts == Counter()  # no item(), tolist(), bool(tensor), ... in the per-token path
    assert logits_shapes == {(2, 64)}
    assert [layer.k.data_ptr() for layer in state.cache.layers] == buffers  # written in place, never reallocated


@pytest.mark.parametrize("name", ["llama-gqa", "t5"])
def test_checking_every_few_steps_gives_the_same_ids(name, monkeypatch):
    """On accelerators the loop reads "all rows stopped?" every SYNC_EVERY steps and trims; same ids as every step."""
    model = _model(name)
    free = generate(model, ROWS, max_new_tokens=10, eos_token_id=[])
    prefix = 1 if name == "t5" else 6
    eos = int(free[1, prefix + 2])  # the second row stops at its third new token, the first row later or never
    expected = generate(model, ROWS, max_new_tokens=10, eos_token_id=eos)
    beams = beam_search(model, ROWS, num_beams=3, max_new_tokens=10, eos_token_id=eos, num_return_sequences=2)
    monkeypatch.setattr(decode_module, "sync_interval", lambda device: 4)
    monkeypatch.setattr(beam_module, "sync_interval", lambda device: 4)
    assert torch.equal(generate(model, ROWS, max_new_tokens=10, eos_token_id=eos), expected)
    again = beam_search(model, ROWS, num_beams=3, max_new_tokens=10, eos_token_id=eos, num_return_sequences=2)
    assert torch.equal(again.sequences, beams.sequences) and torch.equal(again.scores, beams.scores)


@pytest.mark.parametrize("window", [None, 4])
def test_attention_window_does_not_change_the_ids(window, monkeypatch):
    """On the CPU attention reads the cache in windows; the whole buffer (accelerators) or tiny windows agree."""
    model, t5 = _model("alibi"), _model("t5")
    expected = [generate(model, ROWS, max_new_tokens=12, **SAMPLING | {"eos_token_id": []}),
                beam_search(model, ROWS, num_beams=3, max_new_tokens=12, num_return_sequences=2).sequences,
                generate(t5, ROWS, max_new_tokens=12, eos_token_id=[])]
    monkeypatch.setattr(cache_module, "CPU_WINDOW_STEP", window)
    again = [generate(model, ROWS, max_new_tokens=12, **SAMPLING | {"eos_token_id": []}),
             beam_search(model, ROWS, num_beams=3, max_new_tokens=12, num_return_sequences=2).sequences,
             generate(t5, ROWS, max_new_tokens=12, eos_token_id=[])]
    assert all(torch.equal(a, b) for a, b in zip(expected, again, strict=True))


def test_rotary_table_equals_the_closed_form():
    rotary = Rotary(16, 10000.0)
    positions = torch.tensor([[0, 1, 2, 700], [5, 5, 9, 1023]])
    closed = rotary(positions)
    looked_up = rotary(positions, bound=1024)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(closed, looked_up, strict=True))
    assert rotary.table(1024, positions.device)[0].shape == (1024, 16)
    assert rotary.table(1025, positions.device)[0].shape == (2048, 16)  # grown to the next power of two
    model = _model("llama-gqa").to(torch.bfloat16)
    assert model.rotary.table(8, torch.device("cpu"))[0].dtype == torch.float32  # not rounded by .to(bfloat16)


# ---- CUDA ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # a fixed next-token distribution


@cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_decoding_matches_the_cpu(name):
    cpu = _model(name, init_std=0.3)  # peaked distributions: no near ties for float rounding to flip
    gpu = copy.deepcopy(cpu).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    greedy = generate(cpu, ROWS, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(generate(gpu, ROWS, max_new_tokens=10, eos_token_id=[]).cpu(), greedy)
    # top_k=1 takes the sampling path (temperature, filters, the exponential race) and must equal greedy
    sampled_top1 = generate(gpu, ROWS, max_new_tokens=10, eos_token_id=[], temperature=0.7, top_k=1, seed=0)
    assert torch.equal(sampled_top1.cpu(), greedy)
    seeded = dict(max_new_tokens=10, eos_token_id=[], temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(generate(gpu, ROWS, **seeded), generate(gpu, ROWS, **seeded))  # same seed, same tokens
    beams_cpu = beam_search(cpu, ROWS, num_beams=3, max_new_tokens=8, num_return_sequences=2, eos_token_id=[5])
    beams_gpu = beam_search(gpu, ROWS, num_beams=3, max_new_tokens=8, num_return_sequences=2, eos_token_id=[5])
    assert torch.equal(beams_gpu.sequences.cpu(), beams_cpu.sequences)
    assert (beams_gpu.scores.cpu() - beams_cpu.scores).abs().max() < 1e-3


@cuda
def test_cuda_sampling_follows_the_softmax():
    model = _model("gpt2", vocab_size=len(LOGITS)).to("cuda")
    model.lm_head.register_forward_hook(lambda module, inputs, out: LOGITS.to(out.device).expand(out.shape))
    draws = generate(model, [[0]] * 1000, max_new_tokens=3, seed=0, temperature=1.5, eos_token_id=[])[:, 1:]
    counts = torch.bincount(draws.flatten().cpu(), minlength=len(LOGITS)).double()
    expected = (LOGITS / 1.5).softmax(-1).double() * draws.numel()
    assert float(((counts - expected) ** 2 / expected).sum()) < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


@cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_per_token_step_never_synchronizes(name):
    model = _model(name).to("cuda")
    plan = make_plan(model, ROWS, None, GenerationConfig(max_new_tokens=8, **SAMPLING))
    with inference(model):
        state = start_state(model, plan)
    _steps(model, plan, state, 1)  # the first step may allocate; what it does is the same
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(model, plan, state, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
