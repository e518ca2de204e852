"""Text in, text out with beam search: ``beam_texts`` translates (encoder-decoder) or continues (decoder-only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from formerkit.errors import InputError
from formerkit.generate.beam import beam_search
from formerkit.generate.config import GenerationConfig, special_ids, with_options
from formerkit.generate.prompts import fit_prompts
from formerkit.generate.steps import inference
from formerkit.model import Transformer
from formerkit.tokenizers import Tokenizer


def _text(tokenizer: Tokenizer, new_ids: list[int], eos: tuple[int, ...]) -> str:
    """Decode generated ids up to (not including) the first EOS id."""
    end = next((i for i, token in enumerate(new_ids) if token in eos), len(new_ids))
    return tokenizer.decode(new_ids[:end])


def beam_texts(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], config: GenerationConfig | None = None,
               *, batch_size: int = 64, truncate: str | None = None, **options) -> list[str]:
    """The best beam-search hypothesis of each prompt, as text; one str per prompt, in order.

    ``config`` and ``options`` are GenerationConfig fields; without a config, num_beams defaults
    to 4 here, and early_stopping is False (GenerationConfig's default), which keeps searching
    while a running beam can still beat the finished ones: that matters for label-smoothed
    models, whose early EOS candidates would otherwise fill the finished list before the best
    hypothesis ends. Encoder-decoder models: each prompt is a source, decoded from the decoder
    start id (the config's, else the model config's, else the pad id: the tokenizer's, the start
    token of formerkit's seq2seq training) and the result is the target text. Decoder-only
    models: the result is the prompt followed by its continuation. Prompts are encoded without
    special tokens (an empty one starts from EOS), sorted by length and run in batches of
    ``batch_size``; generation stops at the EOS id (the config's, else the model config's, else
    the tokenizer's). The model runs in eval mode; its training flag is restored afterwards.
    ``truncate`` ("left", "right" or None) cuts prompts too long for the context as
    ``generate_text`` does.
    """
    config = with_options(config, options if config is not None else {"num_beams": 4, **options})
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("beam_texts takes a non-empty list of prompt strings")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids = special_ids(config, model.config, tokenizer_eos=tokenizer.eos_id, tokenizer_pad=tokenizer.pad_id)
    config = dataclasses.replace(config, eos_token_id=ids.eos, pad_token_id=ids.pad,
                                 decoder_start_token_id=ids.start if model.config.kind == "encoder-decoder" else None)
    encoder_decoder = model.config.kind == "encoder-decoder"
    rows, shown = fit_prompts(tokenizer, prompts, model.config, config.max_new_tokens, truncate)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[str] = [""] * len(rows)
    with inference(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            result = beam_search(model, [rows[i] for i in chunk], config)
            width = 1 if encoder_decoder else max(len(rows[i]) for i in chunk)  # the start token, or the prompts
            for i, seq in zip(chunk, result.sequences[::config.num_return_sequences, width:].tolist(),
                                strict=True):
                text = _text(tokenizer, seq, ids.eos)
                out[i] = text if encoder_decoder else shown[i] + text
    return out
