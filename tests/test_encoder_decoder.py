"""The original encoder-decoder Transformer at its real `vaswani-base` shape: forward, loss, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import formerkit as fk


@pytest.fixture(scope="module")
def vaswani():
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset("vaswani-base"))


def test_vaswani_base_shape(vaswani):
    cfg = vaswani.config
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.decoder_layers) == (512, 8, 2048, 6, 6)
    assert len(vaswani.encoder.blocks) == 6 and len(vaswani.decoder.blocks) == 6
    assert vaswani.decoder.blocks[0].cross_attn is not None and vaswani.encoder.blocks[0].cross_attn is None
    # shared source/target/output embeddings: one table of vocab x d_model
    assert vaswani.lm_head.proj.weight is vaswani.tok_embed.weight
    # attention: four bias-free d_model x d_model matrices, as in the paper; FFN with biases; two LayerNorms
    per_layer_enc = 4 * 512 * 512 + 2 * 512 * 2048 + 2048 + 512 + 2 * 2 * 512
    per_layer_dec = per_layer_enc + 4 * 512 * 512 + 2 * 512
    assert vaswani.num_parameters() == 37000 * 512 + 6 * per_layer_enc + 6 * per_layer_dec


@pytest.mark.slow
def test_vaswani_base_forward_loss_backward(vaswani):
    vaswani.train()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 37000, (2, 12), generator=g)
    tgt = torch.randint(0, 37000, (2, 9), generator=g)
    src_mask = torch.ones_like(src)
    src_mask[1, 8:] = 0
    labels = torch.randint(0, 37000, (2, 9), generator=g)  # unrelated to the inputs
    labels[0, -2:] = -100
    out = vaswani(src, src_mask, decoder_input_ids=tgt, labels=labels)
    assert out.logits.shape == (2, 9, 37000) and out.encoder_hidden_states.shape == (2, 12, 512)
    # the loss is the mean token cross-entropy over non-ignored labels, near ln(vocab) at init
    # for targets unrelated to the input
    expected = F.cross_entropy(out.logits.reshape(-1, 37000), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected)
    assert abs(out.loss.item() - torch.log(torch.tensor(37000.0)).item()) < 1.5
    out.loss.backward()
    grads = {n: p.grad for n, p in vaswani.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["encoder.blocks.0.attn.qkv.weight"].abs().sum() > 0  # gradient reaches the encoder
    assert grads["decoder.blocks.5.cross_attn.kv.weight"].abs().sum() > 0
    vaswani.zero_grad()
    vaswani.eval()


def test_source_padding_is_invisible_to_the_decoder(vaswani):
    vaswani.eval()
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, 37000, (1, 6), generator=g)
    tgt = torch.randint(0, 37000, (1, 5), generator=g)
    padded = torch.cat([src, torch.randint(0, 37000, (1, 4), generator=g)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        plain = vaswani(src, decoder_input_ids=tgt).logits
        masked = vaswani(padded, mask, decoder_input_ids=tgt).logits
    assert (plain - masked).abs().max() < 1e-4


def test_decoder_is_causal_and_needs_a_target(vaswani):
    vaswani.eval()
    g = torch.Generator().manual_seed(2)
    src = torch.randint(0, 37000, (1, 6), generator=g)
    tgt = torch.randint(0, 37000, (1, 5), generator=g)
    changed = tgt.clone()
    changed[0, 3:] = (changed[0, 3:] + 1) % 37000
    with torch.no_grad():
        a = vaswani(src, decoder_input_ids=tgt).logits
        b = vaswani(src, decoder_input_ids=changed).logits
    assert (a[:, :3] - b[:, :3]).abs().max() < 1e-5 and (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
    with pytest.raises(fk.InputError, match="decoder_input_ids"):
        vaswani(src)
