"""The KV cache: prefill + token-by-token decoding equals full recomputation for every scheme."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from formerkit.cache import KVCache
from formerkit.presets import PRESETS

TOL = 1e-4
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=32)
DECODERS = {
    **{name: {} for name in ("gpt2", "gpt2-medium", "llama")},
    "sinusoidal": {"position": "sinusoidal"},
    "alibi": {"position": "alibi"},
    "nope": {"position": "none"},
    "rope-partial-gqa": {"position": "rope", "rotary_fraction": 0.5, "n_kv_heads": 2},
    "mqa-qknorm": {"preset": "llama", "n_kv_heads": 1, "qk_norm": True},
    "sliding": {"preset": "llama", "sliding_window": 3},
    "parallel-post": {"parallel_block": True},
    "linear": {"preset": "llama", "attn_type": "linear"},
    "clipped-gated": {"preset": "llama", "attn_type": "clipped", "attn_gate": True},
}


def _decoder(name: str, **kw) -> fk.Transformer:
    overrides = dict(DECODERS.get(name, {}))
    preset = overrides.pop("preset", name if name in PRESETS else "gpt2")
    if preset == "llama":
        overrides.setdefault("n_kv_heads", 2)
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **overrides, **kw})).eval()


def _decode_stepwise(model, ids, mask=None, chunks=(5,)):
    """Prefill the first chunk, then feed the rest in the given chunk sizes, then one by one."""
    cache = KVCache.for_model(model, ids.shape[0], 32)
    outs, start = [], 0
    sizes = list(chunks) + [1] * ids.shape[1]
    with torch.no_grad():
        for size in sizes:
            if start >= ids.shape[1]:
                break
            end = min(start + size, ids.shape[1])
            kw = {"attention_mask": mask[:, :end]} if mask is not None else {}
            if mask is not None:
                kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]
            outs.append(model(ids[:, start:end], cache=cache, **kw).logits)
            start = end
    assert cache.length == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_cached_equals_uncached(name):
    model = _decoder(name)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    assert (_decode_stepwise(model, ids) - full).abs().max() < TOL
    assert (_decode_stepwise(model, ids, chunks=(1,)) - full).abs().max() < TOL
    assert (_decode_stepwise(model, ids, chunks=(3, 4)) - full).abs().max() < TOL


@pytest.mark.parametrize("name", ["gpt2", "llama", "alibi", "sliding", "sinusoidal", "linear"])
def test_left_padded_cached_rows_equal_unpadded(name):
    model = _decoder(name)
    g = torch.Generator().manual_seed(2)
    short = torch.randint(0, 64, (1, 6), generator=g)
    long = torch.randint(0, 64, (1, 9), generator=g)
    pad = torch.zeros(1, 3, dtype=torch.long)
    ids = torch.cat([torch.cat([pad, short], 1), long])  # left padding
    mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    logits = _decode_stepwise(model, ids, mask, chunks=(5,))
    with torch.no_grad():
        alone_short, alone_long = model(short).logits, model(long).logits
    assert (logits[0, 3:] - alone_short[0]).abs().max() < TOL
    assert (logits[1] - alone_long[0]).abs().max() < TOL


def test_encoder_decoder_cache_equals_full():
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("vaswani-base", **{**SMALL, "n_decoder_layers": 3})).eval()
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(0, 64, (2, 7), generator=g), torch.randint(0, 64, (2, 6), generator=g)
    src_mask = torch.ones_like(src)
    src_mask[1, 5:] = 0
    with torch.no_grad():
        full = model(src, src_mask, decoder_input_ids=tgt).logits
        cache = KVCache.for_model(model, 2, 16)
        steps = [model(src, src_mask, decoder_input_ids=tgt[:, :2], cache=cache).logits]
        for t in range(2, 6):  # the source is encoded once; later calls need no input_ids
            steps.append(model(None, decoder_input_ids=tgt[:, t:t + 1], cache=cache).logits)
    assert (torch.cat(steps, 1) - full).abs().max() < TOL
    assert all(c.k is not None for c in cache.cross)


def test_eager_and_hooks_with_cache():
    model = _decoder("llama", attn_backend="eager")
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
    assert (_decode_stepwise(model, ids, chunks=(3,)) - full).abs().max() < TOL
    patterns = []
    model.blocks[0].attn.hook_pattern.register_forward_hook(lambda m, i, o: patterns.append(o))
    cache = KVCache.for_model(model, 1, 16)
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        model(ids[:, 5:6], cache=cache)
    assert patterns[-1].shape == (1, 4, 1, 16)  # one query over the whole static buffer ...
    assert torch.allclose(patterns[-1][..., :6].sum(-1), torch.ones(1, 4, 1))  # ... attending to the six cached keys
    assert not patterns[-1][..., 6:].any()


def test_cache_errors():
    model = _decoder("gpt2")
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(fk.InputError, match="do not fit"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(fk.InputError, match="batch of 1"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
        with pytest.raises(fk.InputError, match=r"\(1, 7\) \(6 cached \+ 1 new tokens\)"):
            model(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), cache=cache)
    encoder = fk.Transformer(fk.ModelConfig.from_preset("minilm-l6", **SMALL))
    with pytest.raises(fk.InputError, match="no KV cache"):
        KVCache.for_model(encoder, 1)
    cache.reset()
    assert cache.length == 0
