"""Layers against closed forms and hand computations: positions, norms, feed-forward, masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from formerkit.layers.attention import Attention
from formerkit.layers.feedforward import FeedForward
from formerkit.layers.masks import attention_bias
from formerkit.layers.norm import LayerNorm, RMSNorm, build_norm
from formerkit.layers.position import Rotary, alibi_bias, alibi_slopes, apply_rotary, sinusoidal

NEG = torch.finfo(torch.float32).min


# ---- sinusoidal ----------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 8, 16])
def test_sinusoidal_matches_paper_formula(dim):
    positions = torch.tensor([[0, 1, 2, 7], [3, 15, 100, 511]])
    table = sinusoidal(positions, dim)
    assert table.shape == (2, 4, dim) and table.dtype == torch.float32
    for b in range(2):
        for t in range(4):
            p = int(positions[b, t])
            for i in range(dim // 2):
                angle = p / 10000 ** (2 * i / dim)
                assert table[b, t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-4)
                assert table[b, t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-4)


# ---- RoPE ----------------------------------------------------------------------------


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate x (B, T, H, D) at positions (B, T)."""
    return apply_rotary(x, *rotary(positions))


def test_rope_matches_hand_rotation():
    """Rotate-half layout: dims j and j + R/2 form a pair rotated by p * theta^(-2j/R)."""
    torch.manual_seed(0)
    R, theta = 8, 10000.0
    x = torch.randn(1, 3, 2, R)
    positions = torch.tensor([[0, 1, 5]])
    out = rotate(x, positions, Rotary(R, theta))
    for t in range(3):
        p = int(positions[0, t])
        for h in range(2):
            for j in range(R // 2):
                angle = p * theta ** (-2 * j / R)
                a, b = x[0, t, h, j].item(), x[0, t, h, j + R // 2].item()
                assert out[0, t, h, j].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
                assert out[0, t, h, j + R // 2].item() == pytest.approx(
                    b * math.cos(angle) + a * math.sin(angle), abs=1e-5
                )


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_dot_product_depends_only_on_offset(theta):
    torch.manual_seed(0)
    D = 16
    rotary = Rotary(D, theta)
    q, k = torch.randn(1, 1, 3, D), torch.randn(1, 1, 3, D)
    for m, n in [(5, 2), (0, 9), (7, 7)]:
        dots = []
        for shift in [0, 3, 11, 40]:
            rq = rotate(q, torch.tensor([[m + shift]]), rotary)
            rk = rotate(k, torch.tensor([[n + shift]]), rotary)
            dots.append((rq * rk).sum(-1))  # (1, 1, 3): one dot product per head
        for d in dots[1:]:
            torch.testing.assert_close(d, dots[0], atol=1e-5, rtol=0)
    # and the position does matter: a different offset gives a different dot product
    a = (rotate(q, torch.tensor([[5]]), rotary) * rotate(k, torch.tensor([[2]]), rotary)).sum(-1)
    b = (rotate(q, torch.tensor([[5]]), rotary) * rotate(k, torch.tensor([[3]]), rotary)).sum(-1)
    assert (a - b).abs().max() > 1e-3


def test_rope_preserves_norms_and_position_zero_is_identity():
    torch.manual_seed(0)
    rotary = Rotary(16, 10000.0)
    x = torch.randn(2, 6, 4, 16)
    positions = torch.arange(6).expand(2, 6) * 13
    out = rotate(x, positions, rotary)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: angle 0
    assert (out[:, 1:] - x[:, 1:]).abs().max() > 1e-2


def test_partial_rotary_leaves_other_dims_unchanged():
    torch.manual_seed(0)
    rotary = Rotary(4, 10000.0)  # rotate 4 of 12 dims
    x = torch.randn(1, 5, 2, 12)
    positions = torch.arange(1, 6)[None]
    out = rotate(x, positions, rotary)
    assert torch.equal(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out[..., :4], rotate(x[..., :4].contiguous(), positions, rotary))
    torch.testing.assert_close(out[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))
    assert (out[..., :4] - x[..., :4]).abs().max() > 1e-2


# ---- ALiBi ---------------------------------------------------------------------------


def test_alibi_slopes_power_of_two():
    expected = torch.tensor([2.0 ** (-8 * i / 8) for i in range(1, 9)])
    assert torch.equal(alibi_slopes(8), expected)  # 1/2, 1/4, ..., 1/256
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2.0 ** (-0.5 * i) for i in range(1, 17)]))


def test_alibi_slopes_non_power_of_two_follow_paper():
    # The paper's code: slopes of the closest lower power of two, then every other slope of
    # the next power of two, for the remaining heads.
    six = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six))
    twelve = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve))


def test_alibi_bias_values():
    slopes = alibi_slopes(4)
    q_pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    k_pos = torch.tensor([[0, 1, 2, 3, 4], [0, 2, 4, 6, 8]])
    bias = alibi_bias(slopes, q_pos, k_pos)
    assert bias.shape == (2, 4, 4, 5)
    for b in range(2):
        for h in range(4):
            for i in range(4):
                for j in range(5):
                    want = -slopes[h].item() * abs(q_pos[b, i].item() - k_pos[b, j].item())
                    assert bias[b, h, i, j].item() == pytest.approx(want, abs=1e-6)


# ---- norms ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_by_hand(bias):
    torch.manual_seed(0)
    norm = LayerNorm(6, eps=1e-5, bias=bias)
    assert (norm.bias is not None) == bias
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
        if bias:
            norm.bias.copy_(torch.randn(6))
    x = torch.randn(3, 4, 6) * 3 + 1
    mean = x.sum(-1, keepdim=True) / 6
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / 6  # biased variance
    want = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight
    if bias:
        want = want + norm.bias
    torch.testing.assert_close(norm(x), want, atol=1e-5, rtol=1e-5)


def test_rmsnorm_by_hand():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
    x = torch.randn(3, 4, 6) * 2 + 0.5  # non-zero mean: RMSNorm must not subtract it
    rms = torch.sqrt((x**2).sum(-1, keepdim=True) / 6 + 1e-6)
    torch.testing.assert_close(norm(x), x / rms * norm.weight, atol=1e-5, rtol=1e-5)


def test_build_norm():
    assert isinstance(build_norm("rmsnorm", 4, 1e-6, True), RMSNorm)
    ln = build_norm("layernorm", 4, 1e-3, False)
    assert isinstance(ln, LayerNorm) and ln.bias is None and ln.eps == 1e-3


# ---- feed-forward --------------------------------------------------------------------

HAND_ACTS = {
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
}


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    y = x @ layer.weight.T
    return y + layer.bias if layer.bias is not None else y


@pytest.mark.parametrize("activation", sorted(HAND_ACTS))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_feedforward_by_hand(activation, gated, bias):
    torch.manual_seed(0)
    ff = FeedForward(8, 12, activation, gated, bias)
    for p in ff.parameters():  # non-zero biases too
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 8)
    act = HAND_ACTS[activation]
    if gated:  # SwiGLU (silu) / GeGLU (gelu): act(gate) * linear branch
        hidden = act(linear(x, ff.fc_gate)) * linear(x, ff.fc_in)
    else:
        hidden = act(linear(x, ff.fc_in))
    torch.testing.assert_close(ff(x), linear(hidden, ff.fc_out), atol=1e-4, rtol=1e-4)
    assert (ff.fc_gate is not None) == gated and (ff.fc_in.bias is not None) == bias


# ---- masks ---------------------------------------------------------------------------


def allowed(bias: torch.Tensor) -> torch.Tensor:
    return bias == 0


def test_plain_causal_needs_no_bias():
    assert attention_bias(dtype=torch.float32, q_len=4, k_len=4, causal=True) is None
    assert attention_bias(dtype=torch.float32, q_len=4, k_len=4, causal=False) is None


def test_causal_and_padding_mask():
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    bias = attention_bias(dtype=torch.float32, q_len=5, k_len=5, causal=True, key_mask=key_mask)
    assert bias.shape == (2, 1, 5, 5)
    assert set(bias.unique().tolist()) <= {0.0, NEG}
    for b in range(2):
        for i in range(5):
            for j in range(5):
                assert allowed(bias)[b, 0, i, j] == (j <= i and key_mask[b, j] == 1)


def test_padding_mask_without_causal():
    key_mask = torch.tensor([[1, 0, 1, 1]])
    bias = attention_bias(dtype=torch.float32, q_len=3, k_len=4, causal=False, key_mask=key_mask)
    want = key_mask.bool()[:, None, None, :].expand(1, 1, 3, 4)
    assert torch.equal(allowed(bias), want)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_sliding_window_causal(window):
    bias = attention_bias(dtype=torch.float32, q_len=6, k_len=6, causal=True, sliding_window=window)
    for i in range(6):
        for j in range(6):
            assert bool(allowed(bias)[0, 0, i, j]) == (0 <= i - j < window)
    assert allowed(bias)[0, 0].sum(-1).tolist() == [min(i + 1, window) for i in range(6)]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_sliding_window_bidirectional_is_a_band(window):
    bias = attention_bias(dtype=torch.float32, q_len=6, k_len=6, causal=False, sliding_window=window)
    for i in range(6):
        for j in range(6):
            assert bool(allowed(bias)[0, 0, i, j]) == (abs(i - j) < window)


def test_queries_are_the_last_keys():
    # 2 queries over 5 keys: query 0 sits at key index 3, query 1 at key index 4.
    bias = attention_bias(dtype=torch.float32, q_len=2, k_len=5, causal=True, sliding_window=2,
                          key_mask=torch.ones(1, 5))
    assert allowed(bias)[0, 0].int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_alibi_folded_into_bias():
    slopes = alibi_slopes(2)
    pos = torch.arange(4)[None]
    bias = attention_bias(dtype=torch.float32, q_len=4, k_len=4, causal=True, alibi=(slopes, pos, pos))
    assert bias.shape == (1, 2, 4, 4)
    for h in range(2):
        for i in range(4):
            for j in range(4):
                want = -slopes[h].item() * (i - j) if j <= i else NEG
                assert bias[0, h, i, j].item() == pytest.approx(want)


# ---- attention -----------------------------------------------------------------------


def hand_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v per head, query head h reading kv head h // group."""
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.d_head
    q, k, v = linear(x, attn.qkv).split([H * D, KV * D, KV * D], dim=-1)
    B, T, _ = x.shape
    heads = []
    for h in range(H):
        g = h // (H // KV)
        qh, kh, vh = q[..., h * D:(h + 1) * D], k[..., g * D:(g + 1) * D], v[..., g * D:(g + 1) * D]
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)  # (B, T, T)
        if bias is not None:
            scores = scores + bias[:, 0]
        heads.append(scores.softmax(-1) @ vh)
    return linear(torch.cat(heads, dim=-1), attn.out)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_by_hand(backend, kv_heads):
    torch.manual_seed(0)
    attn = Attention(16, 4, kv_heads, 4, backend=backend).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    bias = attention_bias(dtype=torch.float32, q_len=5, k_len=5, causal=True, key_mask=key_mask)
    torch.testing.assert_close(attn(x, bias=bias, is_causal=True), hand_attention(attn, x, bias),
                               atol=1e-5, rtol=1e-5)
    causal = torch.zeros(1, 1, 5, 5).masked_fill(torch.ones(5, 5).triu(1).bool(), NEG)
    torch.testing.assert_close(attn(x, is_causal=True), hand_attention(attn, x, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_fully_masked_row_is_uniform_not_nan(backend):
    torch.manual_seed(0)
    attn = Attention(16, 2, 2, 8, backend=backend).eval()
    x = torch.randn(2, 4, 16)
    key_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])  # second sequence: nothing to attend to
    bias = attention_bias(dtype=torch.float32, q_len=4, k_len=4, causal=False, key_mask=key_mask)
    out = attn(x, bias=bias)
    assert torch.isfinite(out).all()
    patterns = []
    attn.hook_pattern.register_forward_hook(lambda m, i, o: patterns.append(o))
    out_eager = attn(x, bias=bias)
    torch.testing.assert_close(out_eager, out, atol=1e-5, rtol=1e-5)
    pattern = patterns[0]  # (B, H, T, S)
    assert torch.isfinite(pattern).all()
    torch.testing.assert_close(pattern[1], torch.full((2, 4, 4), 0.25))
    assert torch.all(pattern[0, ..., 2:] == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 2, 4))
    # uniform attention over all keys: the output is the mean of the values
    v = linear(x, attn.qkv)[..., 32:]
    torch.testing.assert_close(out[1], linear(v[1].mean(0, keepdim=True).expand(4, 16), attn.out),
                               atol=1e-5, rtol=1e-5)
    assert not F.softmax(bias[1, 0].float(), dim=-1).isnan().any()
