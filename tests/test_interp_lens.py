"""DecoderLens: each row equals the model with its encoder cut after that layer."""

from __future__ import annotations

import copy

import pytest
import torch

import formerkit as fk
from formerkit.errors import InputError
from formerkit.interp.lens import decoder_lens

VOCAB = 64


def build(preset: str) -> fk.Transformer:
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset(preset, n_layers=3, n_decoder_layers=2, d_model=32, n_heads=4, d_ff=64,
                                     vocab_size=VOCAB, max_seq_len=16, init_std=0.3)
    return fk.Transformer(cfg).eval()


@pytest.mark.parametrize("preset", ["t5-small", "bart-base"])
def test_each_row_is_the_model_with_a_shorter_encoder(preset):
    model = build(preset)
    gen = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(2, VOCAB, (2, 6), generator=gen), torch.randint(2, VOCAB, (2, 4), generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    lens, labels = decoder_lens(model, src, tgt, attention_mask=mask)
    assert labels == ["0_post", "1_post", "2_post"] and lens.shape == (3, 2, 4, VOCAB)
    for i in range(3):
        cut = copy.deepcopy(model)
        cut.encoder.blocks = cut.encoder.blocks[: i + 1]
        with torch.no_grad():
            expected = cut(src, mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(lens[i], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lens[0], lens[2], atol=1e-3)  # the layers differ


def test_decoder_lens_refuses_single_stack_models():
    model = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=1, d_model=16, n_heads=2, d_ff=32,
                                                      vocab_size=VOCAB, max_seq_len=8))
    with pytest.raises(InputError, match="encoder-decoder"):
        decoder_lens(model, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
