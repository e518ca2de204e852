"""DecoderLens (Langedijk et al., 2023): an encoder–decoder's decoder reading each encoder layer's output.

The logit lens reads a decoder-only model's intermediate streams through its head; an
encoder–decoder's encoder has no head of its own, but its decoder can cross-attend to an
intermediate encoder layer instead of the last one. ``decoder_lens`` does that for every encoder
layer at once: the source batch is repeated once per layer, and a hook on the last encoder block's
output puts layer i's output in copy i, so the encoder's final norm and the whole decoder run on
it as they would on the real encoder output. No training (the "tuned-free" variant).
"""

from __future__ import annotations

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.interp.run import run_with_cache, run_with_hooks


@torch.no_grad()
def decoder_lens(model: nn.Module, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, *,
                 attention_mask: torch.Tensor | None = None,
                 decoder_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str]]:
    """Return the decoder's logits over each encoder layer's output: ((enc_layers, batch, tgt, vocab), labels).

    Labels "0_post", ..., one per encoder layer; the last row is the model's own logits. Padding
    masks are passed to every copy, so padded sources read as they do in a plain forward.
    """
    encoder = getattr(model, "encoder", None)
    if encoder is None or getattr(model, "decoder", None) is None:
        raise InputError("decoder_lens needs an encoder-decoder model (T5, BART, the original Transformer)")
    if getattr(model, "lm_head", None) is None:
        raise InputError("decoder_lens needs a model with an LM head")
    n = len(encoder.blocks)
    kwargs = {"attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
              "decoder_attention_mask": decoder_attention_mask}
    _, cache = run_with_cache(model, input_ids, names_filter=lambda name: name.startswith("encoder.blocks.")
                              and name.endswith(".hook_resid_post"), **kwargs)
    outputs = torch.cat([cache[f"encoder.blocks.{i}.hook_resid_post"] for i in range(n)])  # (n * B, S, d_model)

    def swap(act: torch.Tensor, hook) -> torch.Tensor:
        return outputs.to(act.dtype)

    repeated = {k: v.repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    last = f"encoder.blocks.{n - 1}.hook_resid_post"
    logits = run_with_hooks(model, input_ids.repeat(n, 1), fwd_hooks=[(last, swap)], **repeated)  # (n * B, T, vocab)
    return logits.view(n, input_ids.shape[0], *logits.shape[1:]), [f"{i}_post" for i in range(n)]
