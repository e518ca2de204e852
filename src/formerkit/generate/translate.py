"""Text in, text out with beam search: ``beam_texts`` translates (encoder-decoder) or continues (decoder-only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from formerkit.errors import InputError
from formerkit.generate.beam import beam_search
from formerkit.generate.prompts import fit_prompts
from formerkit.model import Transformer
from formerkit.tokenizers import Tokenizer


def _batch(rows: list[list[int]], pad: int, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id rows into ids (B, T) and a mask (B, T) of 1/0, on the left (decoder prompts) or the right (sources)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def _text(tokenizer: Tokenizer, new_ids: list[int], eos: int | None) -> str:
    """Decode generated ids up to (not including) the first EOS."""
    if eos is not None and eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    return tokenizer.decode(new_ids)


def beam_texts(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], *, num_beams: int = 4,
               max_new_tokens: int = 50, length_penalty: float = 1.0, early_stopping: bool | str = False,
               batch_size: int = 64, truncate: str | None = None) -> list[str]:
    """The best beam-search hypothesis of each prompt, as text; one str per prompt, in order.

    Encoder-decoder models: each prompt is a source, decoded from the config's
    ``decoder_start_token_id`` (else the tokenizer's pad id, the start token of formerkit's
    seq2seq training) and the result is the target text.
    Decoder-only models: the result is the prompt followed by its continuation. Prompts are
    encoded without special tokens (an empty one starts from EOS), sorted by length and run in
    batches of ``batch_size``; generation stops at the tokenizer's EOS. The model runs in eval
    mode; its training flag is restored afterwards. ``early_stopping`` is ``beam_search``'s: the
    default False keeps searching while a running beam can still beat the finished ones, which
    matters for label-smoothed models, whose early EOS candidates would otherwise fill the
    finished list before the best hypothesis ends. ``truncate`` ("left", "right" or None) cuts
    prompts too long for the context as ``generate_text`` does.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("beam_texts takes a non-empty list of prompt strings")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    encoder_decoder = model.config.kind == "encoder-decoder"
    rows, shown = fit_prompts(tokenizer, prompts, model.config, max_new_tokens, truncate)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    first = model.config.decoder_start_token_id if model.config.decoder_start_token_id is not None else pad
    out: list[str] = [""] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _batch([rows[i] for i in chunk], pad, left=not encoder_decoder, device=device)
            result = beam_search(model, ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                 length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
                                 pad_token_id=pad,
                                 decoder_start_token_id=first if encoder_decoder else None)
            skip = 1 if encoder_decoder else ids.shape[1]  # the decoder start token, or the padded prompt
            for i, seq in zip(chunk, result.sequences[:, skip:].tolist(), strict=True):
                text = _text(tokenizer, seq, eos)
                out[i] = text if encoder_decoder else shown[i] + text
    finally:
        if was_training:
            model.train()
    return out
