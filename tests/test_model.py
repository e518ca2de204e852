"""Transformer: every config switch end to end, then properties checked by brute force."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from formerkit.heads import pool
from formerkit.layers.norm import LayerNorm, RMSNorm

VOCAB = 50
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16)


def config(**overrides) -> fk.ModelConfig:
    return fk.ModelConfig(**{**BASE, **overrides})


def build(seed: int = 0, **overrides) -> fk.Transformer:
    torch.manual_seed(seed)
    return fk.Transformer(config(**overrides)).eval()


def ids(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def inputs(cfg: fk.ModelConfig, B: int = 2, T: int = 8) -> tuple[dict, torch.Tensor | None]:
    """Model kwargs (with right padding in the second row) and matching labels."""
    src = ids(B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3:] = 0
    kwargs = {"input_ids": src, "attention_mask": mask}
    if cfg.type_vocab_size:
        kwargs["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(B, T)
    labels = None
    if cfg.kind == "encoder-decoder":
        tgt = ids(B, T - 2, seed=2)
        kwargs["decoder_input_ids"] = tgt
        labels = tgt.clone()
        labels[0, 0] = -100
    elif cfg.head == "classifier":
        labels = torch.randn(B) if cfg.num_labels == 1 else torch.randint(0, cfg.num_labels, (B,))
    elif cfg.head in ("lm", "mlm"):
        labels = src.masked_fill(mask == 0, -100)
    return kwargs, labels


def same_weights(dst: fk.Transformer, src: fk.Transformer) -> fk.Transformer:
    dst.load_state_dict(src.state_dict())
    return dst.eval()


ENC = dict(kind="encoder", head="mlm")
CLF = dict(kind="encoder", head="classifier")
S2S = dict(kind="encoder-decoder", n_layers=2, n_decoder_layers=1)
VARIANTS = {
    "decoder-default": {},
    "encoder-mlm": ENC,
    "encdec-2-1": {**S2S, "position": "sinusoidal"},
    "encdec-1-2-rope": {**S2S, "n_layers": 1, "n_decoder_layers": 2, "position": "rope"},
    "encdec-post-relu": {**S2S, "norm_placement": "post", "final_norm": False, "activation": "relu",
                         "embed_scale": True},
    "sinusoidal": {"position": "sinusoidal"},
    "rope": {"position": "rope"},
    "rope-partial": {"position": "rope", "rotary_fraction": 0.5, "rope_theta": 500.0},
    "alibi": {"position": "alibi"},
    "nope": {"position": "none"},
    "layernorm-nobias": {"norm_bias": False},
    "rmsnorm": {"norm": "rmsnorm"},
    "post-norm": {"norm_placement": "post"},
    "no-final-norm": {"final_norm": False},
    "relu": {"activation": "relu"},
    "gelu": {"activation": "gelu"},
    "silu": {"activation": "silu"},
    "swiglu": {"activation": "silu", "gated": True},
    "geglu": {"activation": "gelu", "gated": True},
    "no-biases": {"qkv_bias": False, "out_bias": False, "mlp_bias": False},
    "untied": {"tie_embeddings": False},
    "parallel": {"parallel_block": True},
    "qk-norm": {"qk_norm": True},
    "qk-rmsnorm-rope": {"qk_norm": True, "norm": "rmsnorm", "position": "rope"},
    "sliding-window": {"sliding_window": 3},
    "d-head-12": {"d_head": 12},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "attn-scale": {"attn_scale": 0.1},
    "embed-scale": {"embed_scale": True},
    "embed-norm": {"embed_norm": True},
    "eager": {"attn_backend": "eager", "n_kv_heads": 2},
    "bert-like": {**ENC, "type_vocab_size": 2, "embed_norm": True, "norm_placement": "post",
                  "final_norm": False, "pad_token_id": 0},
    "classifier": {**ENC, "head": "classifier", "num_labels": 3},
    "regression": {**ENC, "head": "classifier", "num_labels": 1, "pooling": "cls"},
    "classifier-pooler": {**ENC, "head": "classifier", "pooler": True},
    "decoder-classifier-last": {"head": "classifier", "pooling": "last"},
    "classifier-max": {**ENC, "head": "classifier", "pooling": "max"},
    "no-head-pooler": {**ENC, "head": "none", "pooler": True},
    "no-head-decoder": {"head": "none", "n_layers": 2},
    "llama-like": {"position": "rope", "norm": "rmsnorm", "activation": "silu", "gated": True,
                   "qkv_bias": False, "out_bias": False, "mlp_bias": False, "tie_embeddings": False,
                   "n_kv_heads": 2, "n_layers": 2},
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_forward_loss_backward(overrides):
    model = build(**overrides)
    cfg = model.config
    kwargs, labels = inputs(cfg)
    out = model(**kwargs, labels=labels)
    B = kwargs["input_ids"].shape[0]
    T = kwargs.get("decoder_input_ids", kwargs["input_ids"]).shape[1]
    assert out.hidden_states.shape == (B, T, cfg.d_model)
    assert torch.isfinite(out.hidden_states).all()
    if cfg.head in ("lm", "mlm"):
        assert out.logits.shape == (B, T, VOCAB)
    elif cfg.head == "classifier":
        assert out.logits.shape == (B, cfg.num_labels)
    else:
        assert out.logits is None and out.loss is None
    if cfg.kind == "encoder-decoder":
        assert out.encoder_hidden_states.shape == (B, kwargs["input_ids"].shape[1], cfg.d_model)
    if cfg.pooler:
        torch.testing.assert_close(out.pooled, torch.tanh(model.pooler.dense(out.hidden_states[:, 0])))
    loss = out.loss if out.loss is not None else out.hidden_states.pow(2).mean()
    if out.pooled is not None:
        loss = loss + out.pooled.pow(2).mean()
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, param in model.named_parameters():  # every module the switch added takes part
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_switches_build_the_right_modules():
    s2s = build(**S2S)
    assert (len(s2s.encoder.blocks), len(s2s.decoder.blocks)) == (2, 1)
    assert s2s.encoder.blocks[0].cross_attn is None and s2s.decoder.blocks[0].cross_attn is not None
    assert s2s.lm_head.proj.weight is s2s.tok_embed.weight  # one shared token table, tied

    tied, untied = build(), build(tie_embeddings=False)
    assert tied.lm_head.proj.weight is tied.tok_embed.weight
    assert untied.lm_head.proj.weight is not untied.tok_embed.weight
    assert tied.num_parameters() == untied.num_parameters() - VOCAB * 32

    plain = build(qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False)
    block = plain.blocks[0]
    assert block.attn.qkv.bias is None and block.attn.out.bias is None
    assert block.mlp.fc_in.bias is None and block.mlp.fc_out.bias is None
    assert block.ln1.bias is None and isinstance(block.ln1, LayerNorm)
    assert isinstance(build(norm="rmsnorm").ln_final, RMSNorm)
    assert build(final_norm=False).ln_final is None
    assert build(parallel_block=True).blocks[0].ln2 is None
    assert build(gated=True).blocks[0].mlp.fc_gate is not None
    assert build(d_head=12).blocks[0].attn.qkv.out_features == 3 * 4 * 12
    assert build(n_kv_heads=1).blocks[0].attn.qkv.out_features == (4 + 2) * 8
    assert build(qk_norm=True).blocks[0].attn.q_norm is not None
    assert build(position="rope").pos_embed is None and build().pos_embed.num_embeddings == 16


def test_switches_change_the_output():
    """Each switch that keeps the weight names must actually change what the model computes."""
    base = build()
    x = ids()
    ref = base(x).logits
    for change in [dict(position="none"), dict(position="sinusoidal"), dict(position="alibi"),
                   dict(norm_placement="post"), dict(final_norm=False), dict(activation="relu"),
                   dict(parallel_block=True), dict(sliding_window=2), dict(attn_scale=1.0),
                   dict(embed_scale=True), dict(norm="rmsnorm", norm_bias=False)]:
        other = fk.Transformer(base.config.replace(**change)).eval()
        assert not other.load_state_dict(base.state_dict(), strict=False).missing_keys
        assert (other(x).logits - ref).abs().max() > 1e-4, change


def test_dropout_in_train_mode():
    model = build(attn_dropout=0.2, resid_dropout=0.2, embed_dropout=0.2, n_kv_heads=2).train()
    kwargs, labels = inputs(model.config)
    a, b = model(**kwargs, labels=labels), model(**kwargs, labels=labels)
    assert (a.logits - b.logits).abs().max() > 1e-4  # dropout is on
    a.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(**kwargs).logits, model(**kwargs).logits, rtol=0, atol=0)


# ---- (a) sdpa and eager agree --------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"position": "alibi"}, {"sliding_window": 3}, {"n_kv_heads": 2, "position": "rope"},
     {"n_kv_heads": 1, "qk_norm": True}, {"position": "alibi", "sliding_window": 2, "n_kv_heads": 2},
     ENC, {**ENC, "position": "alibi"}, S2S],
    ids=["decoder", "alibi", "window", "gqa-rope", "mqa-qknorm", "alibi-window-gqa", "encoder",
         "encoder-alibi", "encdec"],
)
def test_sdpa_matches_eager(overrides):
    sdpa = build(**overrides)
    eager = same_weights(fk.Transformer(sdpa.config.replace(attn_backend="eager")), sdpa)
    kwargs, _ = inputs(sdpa.config)
    left = kwargs["attention_mask"].flip(-1)  # left padding: some rows see nothing at all
    for mask in [None, kwargs["attention_mask"], left]:
        kw = {**kwargs, "attention_mask": mask}
        torch.testing.assert_close(sdpa(**kw).logits, eager(**kw).logits, atol=1e-5, rtol=1e-5)


# ---- (b) causal masking --------------------------------------------------------------


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi", "none"])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 3, "n_kv_heads": 2}, {"attn_backend": "eager"}])
def test_causal_mask_hides_the_future(position, extra):
    model = build(position=position, n_layers=2, **extra)
    x = ids(2, 10)
    ref = model(x).logits
    for t in [0, 4, 8]:
        changed = x.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 7) % VOCAB
        out = model(changed).logits
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert (out[:, t + 1:] - ref[:, t + 1:]).abs().max() > 1e-4  # the changed tokens do matter


def test_encoder_decoder_decoder_is_causal_and_encoder_is_not():
    model = build(**S2S)
    src, tgt = ids(1, 8), ids(1, 6, seed=2)
    ref = model(src, decoder_input_ids=tgt)
    tgt2 = tgt.clone()
    tgt2[:, 3:] = (tgt2[:, 3:] + 1) % VOCAB
    out = model(src, decoder_input_ids=tgt2)
    torch.testing.assert_close(out.logits[:, :3], ref.logits[:, :3], atol=1e-5, rtol=1e-5)
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % VOCAB  # the last source token reaches every target position
    out = model(src2, decoder_input_ids=tgt)
    assert ((out.logits - ref.logits).abs().amax(-1) > 1e-5).all()
    assert ((out.encoder_hidden_states - ref.encoder_hidden_states)[:, 0].abs().max() > 1e-5)


# ---- (c) GQA equals MHA with repeated k/v heads --------------------------------------


def repeat_kv_rows(weight: torch.Tensor, H: int, KV: int, D: int) -> torch.Tensor:
    """Turn fused GQA qkv rows [q (H*D), k (KV*D), v (KV*D)] into MHA rows [q, k (H*D), v (H*D)]."""
    q, k, v = weight.split([H * D, KV * D, KV * D], dim=0)
    group = H // KV
    k_rep = torch.cat([k[(h // group) * D:(h // group + 1) * D] for h in range(H)], dim=0)
    v_rep = torch.cat([v[(h // group) * D:(h // group + 1) * D] for h in range(H)], dim=0)
    return torch.cat([q, k_rep, v_rep], dim=0)


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_gqa_equals_mha_with_repeated_kv(kv_heads, position):
    gqa = build(n_kv_heads=kv_heads, position=position, n_layers=2, qk_norm=position == "rope")
    mha = fk.Transformer(gqa.config.replace(n_kv_heads=None)).eval()
    state = gqa.state_dict()
    for name, tensor in state.items():
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            state[name] = repeat_kv_rows(tensor, 4, kv_heads, 8)
    mha.load_state_dict(state)
    kwargs, _ = inputs(gqa.config)
    torch.testing.assert_close(gqa(**kwargs).logits, mha(**kwargs).logits, atol=1e-5, rtol=1e-5)


# ---- (d) padding ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"position": "rope"}, {"position": "alibi"}, {"sliding_window": 3},
                                       ENC, {**ENC, "position": "alibi", "type_vocab_size": 2}])
def test_right_padding_does_not_change_real_tokens(overrides):
    model = build(**overrides)
    full, n = ids(1, 9), 5
    short = full[:, :n]
    padded = torch.cat([short, ids(1, 4, seed=9)], dim=1)  # junk in the padding
    mask = torch.tensor([[1] * n + [0] * 4])
    ref = model(short).logits
    out = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(out[:, :n], ref, atol=1e-5, rtol=1e-5)
    # in a batch with a longer, unpadded row
    out = model(torch.cat([padded, full]), attention_mask=torch.cat([mask, torch.ones_like(mask)])).logits
    torch.testing.assert_close(out[:1, :n], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], model(full).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "max"])
def test_padding_does_not_change_classifier(pooling):
    model = build(**CLF, pooling=pooling)
    short = ids(1, 5)
    padded = torch.cat([short, ids(1, 3, seed=4)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, model(short).logits,
                               atol=1e-5, rtol=1e-5)


def test_encoder_decoder_source_and_target_padding():
    model = build(**S2S)
    src, tgt = ids(1, 5), ids(1, 4, seed=2)
    ref = model(src, decoder_input_ids=tgt).logits
    src_pad = torch.cat([src, ids(1, 3, seed=5)], dim=1)
    tgt_pad = torch.cat([tgt, ids(1, 2, seed=6)], dim=1)
    out = model(src_pad, torch.tensor([[1] * 5 + [0] * 3]), decoder_input_ids=tgt_pad,
                decoder_attention_mask=torch.tensor([[1] * 4 + [0] * 2])).logits
    torch.testing.assert_close(out[:, :4], ref, atol=1e-5, rtol=1e-5)


# ---- (e) losses by hand --------------------------------------------------------------


def hand_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log p(target) over the (row, position) pairs whose target is not -100."""
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if targets[b, t] != -100:
                total -= torch.log_softmax(logits[b, t].double(), -1)[targets[b, t]].item()
                count += 1
    return torch.tensor(total / count)


def test_causal_lm_loss_by_hand():
    model = build()
    x = ids(2, 8)
    labels = x.clone()
    labels[0, 3] = labels[1, 6:] = -100
    out = model(x, labels=labels)
    # logits at t predict labels at t + 1; the first label is never predicted
    want = hand_cross_entropy(out.logits[:, :-1], labels[:, 1:])
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    labels[:, 0] = (labels[:, 0] + 1) % VOCAB
    assert model(x, labels=labels).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_masked_and_seq2seq_loss_by_hand():
    mlm = build(**ENC)
    x = ids(2, 8)
    labels = torch.full_like(x, -100)
    labels[0, 2], labels[1, 0], labels[1, 7] = 3, 4, 5
    out = mlm(x, labels=labels)
    assert out.loss.item() == pytest.approx(hand_cross_entropy(out.logits, labels).item(), rel=1e-5)

    s2s = build(**S2S)
    tgt = ids(2, 5, seed=3)
    labels = ids(2, 5, seed=4)
    labels[1, 4] = -100
    out = s2s(x, decoder_input_ids=tgt, labels=labels)  # aligned with the decoder inputs, not shifted
    assert out.loss.item() == pytest.approx(hand_cross_entropy(out.logits, labels).item(), rel=1e-5)


def test_classifier_losses_by_hand():
    clf = build(**CLF, num_labels=3)
    x, labels = ids(3, 6), torch.tensor([0, 2, 1])
    out = clf(x, labels=labels)
    want = -sum(torch.log_softmax(out.logits[i].double(), -1)[labels[i]].item() for i in range(3)) / 3
    assert out.loss.item() == pytest.approx(want, rel=1e-5)

    reg = build(**CLF, num_labels=1)
    targets = torch.tensor([0.5, -1.0, 2.0])
    out = reg(x, labels=targets)
    assert out.logits.shape == (3, 1)
    assert out.loss.item() == pytest.approx(((out.logits[:, 0] - targets) ** 2).mean().item(), rel=1e-5)


# ---- (f) bad input -------------------------------------------------------------------


def bad(model: fk.Transformer, match: str, *args, **kwargs) -> None:
    with pytest.raises(fk.InputError, match=match):
        model(*args, **kwargs)


def test_bad_ids():
    model = build()
    bad(model, r"shape \(batch, seq_len\), got \(8,\).*unsqueeze\(0\)", ids()[0])
    bad(model, r"must hold integer token ids, got dtype torch.float32", ids().float())
    bad(model, r"must hold integer token ids, got dtype torch.uint8", ids().to(torch.uint8))
    bad(model, r"must hold integer token ids, got dtype torch.bool", ids().bool())
    assert torch.equal(model(ids().int()).logits, model(ids()).logits)  # int32 is fine
    bad(model, r"token id 50, outside the vocabulary \[0, 50\)", torch.tensor([[1, 50]]))
    bad(model, r"token id -1, outside the vocabulary", torch.tensor([[1, -1]]))
    bad(model, r"input_ids is empty \(shape \(1, 0\)\)", torch.zeros(1, 0, dtype=torch.long))
    bad(model, r"input_ids is empty \(shape \(0, 4\)\)", torch.zeros(0, 4, dtype=torch.long))
    bad(model, r"must be a torch.Tensor", [[1, 2, 3]])
    bad(model, r"learned positions stop at max_seq_len=16; truncate", ids(1, 17))
    assert build(position="rope")(ids(1, 20)).logits.shape == (1, 20, VOCAB)  # no table to overflow


def test_bad_masks_and_token_types():
    model = build()
    x = ids(2, 6)
    bad(model, r"attention_mask must have the same shape as its ids \(2, 6\), got \(2, 5\)", x, torch.ones(2, 5))
    bad(model, r"attention_mask must have the same shape", x, torch.ones(6))
    bad(model, r"only 0 \(padding\) and 1", x, torch.full((2, 6), 2))
    bad(model, r"only 0 \(padding\) and 1", x, torch.full((2, 6), 0.5))
    bad(model, r"no token type embeddings", x, token_type_ids=torch.zeros_like(x))
    bad(model, r"position_ids must have shape", x, position_ids=torch.arange(6))
    bad(model, r"position_ids must hold integer positions, got dtype torch.float32", x,
        position_ids=torch.zeros(2, 6))
    bad(model, r"learned positions stop at max_seq_len=16", x, position_ids=torch.full_like(x, 16))
    bad(model, r"learned positions stop", x, position_ids=torch.full_like(x, -1))
    typed = build(**ENC, type_vocab_size=2)
    bad(typed, r"token_type_ids must be in \[0, 2\)", x, token_type_ids=torch.full_like(x, 2))
    bad(typed, r"token_type_ids must be in \[0, 2\)", x, token_type_ids=torch.full_like(x, -1))
    bad(typed, r"token_type_ids must have shape \(2, 6\)", x, token_type_ids=torch.zeros(2, 5, dtype=torch.long))
    bad(typed, r"token_type_ids must hold integer", x, token_type_ids=torch.zeros(2, 6))
    bad(typed, r"token_type_ids must hold integer", x, token_type_ids=torch.zeros(2, 6, dtype=torch.uint8))


def test_bad_encoder_decoder_inputs():
    model = build(**S2S)
    src = ids(2, 6)
    bad(model, r"needs decoder_input_ids", src)
    bad(model, r"decoder_input_ids must have shape \(batch, seq_len\)", src, decoder_input_ids=src[0])
    bad(model, r"decoder_input_ids contains token id 99", src, decoder_input_ids=torch.full((2, 3), 99))
    bad(model, r"decoder_attention_mask must have the same shape", src, decoder_input_ids=src,
        decoder_attention_mask=torch.ones(2, 5))
    bad(model, r"max_seq_len=16", src, decoder_input_ids=ids(2, 17))


def test_inputs_the_model_would_ignore_are_rejected():
    x = ids(2, 6)
    bad(build(head="none"), r"no head to compute a loss", x, labels=x)
    bad(build(), r"decoder_input_ids/decoder_attention_mask are for encoder-decoder models", x,
        decoder_input_ids=x)
    bad(build(**ENC), r"encoder-decoder models", x, decoder_attention_mask=torch.ones_like(x))


def test_bad_labels():
    x = ids(2, 6)
    bad(build(), r"labels must have shape \(2, 6\) for a language-model head, got \(2, 5\)", x, labels=x[:, :5])
    bad(build(), r"labels must have shape \(2, 6\)", x, labels=x[0])
    bad(build(), r"labels must hold integer class ids", x, labels=x.float())
    bad(build(), r"labels contain 50, outside \[0, 50\)", x, labels=torch.full_like(x, 50))
    bad(build(**ENC), r"labels must have shape \(2, 6\)", x, labels=x[:, 1:])
    bad(build(**S2S), r"labels must have shape \(2, 4\)", x, decoder_input_ids=x[:, :4], labels=x)
    clf = build(**CLF, num_labels=3)
    bad(clf, r"labels must have shape \(2,\) for a classifier head, got \(2, 1\)", x, labels=torch.zeros(2, 1))
    bad(clf, r"labels contain 3, outside \[0, 3\)", x, labels=torch.tensor([0, 3]))


# ---- (g) pooling ---------------------------------------------------------------------


def test_pool_by_hand():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    for b in range(3):
        real = [t for t in range(5) if mask[b, t]]
        rows = hidden[b, real]
        torch.testing.assert_close(pool(hidden, mask, "mean")[b], rows.sum(0) / len(real))
        torch.testing.assert_close(pool(hidden, mask, "max")[b], torch.stack(
            [max(hidden[b, t, d].item() for t in real) * torch.ones(()) for d in range(4)]))
        torch.testing.assert_close(pool(hidden, mask, "last")[b], hidden[b, real[-1]])
        torch.testing.assert_close(pool(hidden, mask, "cls")[b], hidden[b, 0])
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(1))
    torch.testing.assert_close(pool(hidden, None, "max"), hidden.amax(1))
    torch.testing.assert_close(pool(hidden, None, "last"), hidden[:, -1])
    torch.testing.assert_close(pool(hidden, mask.bool(), "mean"), pool(hidden, mask, "mean"))


def test_classifier_uses_configured_pooling():
    for pooling in ["mean", "cls", "last", "max"]:
        model = build(**CLF, pooling=pooling)
        x = ids(2, 6)
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
        out = model(x, mask)
        want = model.classifier.out(pool(out.hidden_states, mask, pooling))
        torch.testing.assert_close(out.logits, want)
        torch.testing.assert_close(out.pooled, pool(out.hidden_states, mask, pooling))
    cls_only = build(**CLF, pooler=True)
    out = cls_only(x, mask)
    torch.testing.assert_close(out.logits, cls_only.classifier.out(out.pooled))
    torch.testing.assert_close(out.pooled, torch.tanh(cls_only.pooler.dense(out.hidden_states[:, 0])))
