"""Fuzzing a model's inputs: token ids out of range or of the wrong dtype or shape, masks all zero, padded left
or right or of the wrong values, positions, token types, labels, pixels. A forward pass either raises one of
formerkit's own errors (FormerkitError) or returns finite outputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import formerkit as fk
from fuzz_strategies import valid_configs

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                      HealthCheck.too_slow])
# the switches that change what a forward pass does with its inputs (masks, positions, pooling, types)
MODEL_SWITCHES = ("kind", "position", "head", "pooling", "pooler", "type_vocab_size", "sliding_window", "attn_backend",
                  "norm_placement", "embed_norm", "num_labels", "n_decoder_layers")
DTYPES = [torch.long, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32, torch.float16]


def sometimes(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws; False is the simplest example, which shrinking goes to."""
    return draw(st.sampled_from([False] * (one_in - 1) + [True]))


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], low: int, high: int) -> torch.Tensor:
    """A tensor of ``shape`` (one time in six, a neighbouring one) with values in [low, high], mostly of dtype long."""
    if sometimes(draw, 6):
        shape = draw(st.sampled_from([shape[:-1], (*shape, 1), (shape[0], shape[-1] + 1), (shape[0], 0), ()]))
    n = 1
    for size in shape:
        n *= size
    values = torch.tensor(draw(st.lists(st.integers(low, high), min_size=n, max_size=n)), dtype=torch.long)
    return values.view(shape).to(draw(st.sampled_from([torch.long] * 4 + DTYPES)))


@st.composite
def masks(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor | None:
    """None, or a 0/1 mask of ``shape``: all ones, all zeros, padded on the right or the left, random, or junk."""
    kind = draw(st.sampled_from(["none", "ones", "right", "left", "zeros", "random", "junk"]))
    if kind == "none":
        return None
    if kind == "junk":
        return draw(tensors(shape, -1, 2))
    b, t = shape
    if kind in ("right", "left"):
        lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))[:, None]  # (B, 1)
        mask = torch.arange(t)[None, :] < lengths if kind == "right" else torch.arange(t)[None, :] >= t - lengths
    elif kind == "random":
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    else:
        mask = torch.full(shape, kind == "ones")
    return mask.to(draw(st.sampled_from([torch.long, torch.int32, torch.bool, torch.float32])))


@st.composite
def model_inputs(draw: st.DrawFn, cfg: fk.ModelConfig) -> dict[str, Any]:
    """Keyword arguments for a forward pass of a model of ``cfg``, valid or not."""
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, cfg.max_seq_len + 2))
    t2 = t  # the length of what the labels align with: the decoder inputs when there are some
    kwargs: dict[str, Any] = {}
    if cfg.patch_size is not None:
        valid = (b, cfg.num_channels, cfg.image_size, cfg.image_size)
        shape = draw(st.sampled_from([valid, valid, valid, (b, cfg.image_size, cfg.image_size, cfg.num_channels),
                                      (cfg.num_channels, cfg.image_size, cfg.image_size), (0, cfg.num_channels, 2, 2)]))
        kwargs["pixel_values"] = draw(tensors(shape, -3, 3)).to(draw(st.sampled_from([torch.float32, torch.long])))
    else:
        low, high = draw(st.sampled_from([(0, cfg.vocab_size - 1)] * 3 + [(-2, cfg.vocab_size + 1)]))
        kwargs["input_ids"] = [[1, 2, 3]] if sometimes(draw, 10) else draw(tensors((b, t), low, high))
        kwargs["attention_mask"] = draw(masks((b, t)))
        if cfg.kind == "encoder-decoder" or sometimes(draw, 5):
            t2 = draw(st.integers(1, cfg.max_seq_len + 1))
            kwargs["decoder_input_ids"] = draw(tensors((b, t2), low, high))
            kwargs["decoder_attention_mask"] = draw(masks((b, t2)))
        if sometimes(draw, 4):
            kwargs["position_ids"] = draw(tensors((b, t), -2, cfg.max_seq_len + 1))
        if sometimes(draw, 4):
            kwargs["token_type_ids"] = draw(tensors((b, t), -1, max(cfg.type_vocab_size, 1)))
    if sometimes(draw, 2):
        right = (b,) if cfg.head == "classifier" else (b, t2)
        shape = draw(st.sampled_from([right, right, right, (b,) if right != (b,) else (b, t2)]))
        labels = draw(tensors(shape, -1, max(cfg.vocab_size, cfg.num_labels)))
        ignored = draw(st.lists(st.booleans(), min_size=labels.numel(), max_size=labels.numel()))
        if labels.dtype == torch.long:  # some positions ignored (-100)
            labels = labels.masked_fill(torch.tensor(ignored, dtype=torch.bool).view(labels.shape), -100)
        kwargs["labels"] = labels
    return {k: v for k, v in kwargs.items() if v is not None}


def _finite_inputs(kwargs: dict[str, Any]) -> bool:
    return all(not isinstance(v, torch.Tensor) or not v.is_floating_point() or bool(v.isfinite().all())
               for v in kwargs.values())


@FUZZ
@given(valid_configs(MODEL_SWITCHES), st.data())
def test_any_inputs_raise_formerkit_errors_or_give_finite_outputs(one_thread, cfg, data):
    torch.manual_seed(0)
    model = fk.Transformer(cfg).eval()
    kwargs = data.draw(model_inputs(cfg))
    try:
        with torch.no_grad():
            out = model(**kwargs)
    except fk.FormerkitError as err:
        event(f"{type(err).__name__}: {str(err)[:70]}")
        return
    event("ran")
    assert _finite_inputs(kwargs)
    for name in ("logits", "hidden_states", "loss", "pooled", "encoder_hidden_states"):
        value = getattr(out, name)
        assert value is None or bool(torch.isfinite(value).all()), name


@pytest.mark.parametrize("causal", [True, False])
def test_labels_with_nothing_to_predict_are_an_input_error(causal):
    """Found by fuzzing: a one-token causal LM sequence (or labels all -100) gave a NaN loss."""
    cfg = fk.ModelConfig.from_preset("gpt2" if causal else "bert-base", n_layers=1, d_model=8, n_heads=2, d_ff=8,
                                     vocab_size=16, max_seq_len=8)
    model = fk.Transformer(cfg)
    ids = torch.tensor([[3]]) if causal else torch.tensor([[3, 4]])
    labels = ids if causal else torch.full_like(ids, -100)
    with pytest.raises(fk.InputError, match="labels leave no position to predict"):
        model(ids, labels=labels)
    ids = torch.tensor([[3, 4]])
    assert torch.isfinite(model(ids, labels=torch.tensor([[-100, 4]])).loss)  # one target is enough


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_labels_of_any_integer_dtype_give_the_same_loss(dtype):
    """Found by fuzzing: int32 labels reached cross_entropy, which takes int64 only, and raised a RuntimeError."""
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=1, d_model=8, n_heads=2, d_ff=8, vocab_size=16,
                                                      max_seq_len=8)).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    assert model(ids, labels=ids.to(dtype)).loss == model(ids, labels=ids).loss
