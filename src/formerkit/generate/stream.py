"""Text in, text out: ``generate_text``, with stop strings and printing-friendly streaming.

Each row's continuation is decoded as a whole after every new token (so a multi-byte
character split over several tokens is never shown half-made), cut before the first stop
string, and released in pieces that never end in U+FFFD or in the beginning of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.generate.decode import decode_loop, make_plan
from formerkit.generate.prompts import fit_prompts, heal_prompts
from formerkit.tokenizers import Tokenizer

_CONTEXT = 8  # prompt tokens decoded before the continuation, so tokenizers that treat a text's start specially agree


class _RowText:
    """One row's continuation as text: tokens in, text cut at a stop string, released in safe pieces."""

    def __init__(self, tokenizer: Tokenizer, context: list[int], eos: set[int], stop_strings: list[str]) -> None:
        self.tokenizer, self.context, self.eos, self.stop_strings = tokenizer, context, eos, stop_strings
        self.prefix = tokenizer.decode(context)
        self.tokens: list[int] = []
        self.text = ""  # the continuation so far, cut before a stop string
        self.released = 0  # how much of ``text`` has been handed out as pieces

    def add(self, token: int) -> bool:
        """Append a generated token (an EOS id adds no text); return True once a stop string appears."""
        if token in self.eos:
            return False
        self.tokens.append(token)
        full = self.tokenizer.decode(self.context + self.tokens)
        text = full[len(self.prefix):] if full.startswith(self.prefix) else self.tokenizer.decode(self.tokens)
        cuts = [text.find(s) for s in self.stop_strings if s in text]
        self.text = text[:min(cuts)] if cuts else text
        return bool(cuts)

    def release(self, final: bool) -> str:
        """The text not handed out yet; unless ``final``, minus a trailing U+FFFD or start of a stop string."""
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip("\ufffd"))
            end -= max((n for s in self.stop_strings for n in range(1, len(s)) if self.text[:end].endswith(s[:n])),
                       default=0)
        piece = self.text[self.released:end]
        self.released = max(self.released, end)
        return piece


def _stop_strings(stop_strings: str | Sequence[str] | None) -> list[str]:
    if stop_strings is None:
        return []
    strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise InputError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")
    return list(strings)


def _pieces(prompt: str, row: _RowText, steps: Iterator) -> Iterator[str]:
    """The prompt, then the continuation in pieces as tokens arrive."""
    if prompt:
        yield prompt
    for _ in steps:
        piece = row.release(final=False)
        if piece:
            yield piece
    piece = row.release(final=True)
    if piece:
        yield piece


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt_or_prompts: str | Sequence[str], *,
                  max_new_tokens: int = 50, stop_strings: str | Sequence[str] | None = None, stream: bool = False,
                  truncate: str | None = None, heal: bool = False,
                  **sampling) -> str | list[str] | Iterator[str]:
    """Continue a prompt (or a batch of prompts) and return prompt + continuation as text.

    Prompts are encoded with ``add_special_tokens=False``; an empty one starts from the
    tokenizer's EOS id. A row stops at the EOS id (``tokenizer.eos_id`` unless
    ``eos_token_id`` is given; the EOS is not part of the text) or once its continuation
    contains a stop string; the text is cut before the stop string. ``sampling`` takes the
    other arguments of ``generate`` (temperature, top_k, top_p, min_p, repetition_penalty,
    stop, seed, ...). Returns a str for a str prompt, a list for a list; for encoder-decoder
    models, the generated target text only. With ``stream=True`` (one str prompt) returns an
    iterator of text pieces, the prompt first, that join to the non-streamed result.

    ``truncate`` ("left" or "right") cuts a prompt longer than ``max_seq_len - max_new_tokens``
    tokens (an encoder-decoder's source: ``max_seq_len``) to that length: "left" drops its start,
    "right" its end; a cut prompt is shown as its kept tokens decoded. ``None`` (default) leaves
    prompts whole, and a prompt too long for learned positions is an InputError. Prompt characters
    a char tokenizer does not know become ``<unk>``, with a FormerkitWarning naming them.

    ``heal`` (token healing, decoder-only models): a prompt's last token is taken back when other
    tokens start with its text, and the first new token must start with that text. A prompt
    ending in a space ("def ") otherwise leaves a BPE model a lone space token, which its training
    text almost never has (spaces there belong to the next word's token).
    """
    single = isinstance(prompt_or_prompts, str)
    prompts = [prompt_or_prompts] if single else prompt_or_prompts
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("generate_text takes a prompt string or a non-empty list of prompt strings")
    if stream and not single:
        raise InputError("stream=True takes a single prompt string; generate a list of prompts without streaming")
    encoder_decoder = model.config.kind == "encoder-decoder"
    ids, shown = fit_prompts(tokenizer, prompts, model.config, max_new_tokens, truncate)
    first_allowed = None
    if heal and not encoder_decoder:
        ids, shown, first_allowed = heal_prompts(tokenizer, ids, shown, model.config.vocab_size)
    sampling.setdefault("eos_token_id", tokenizer.eos_id)
    sampling.setdefault("pad_token_id", tokenizer.pad_id)
    plan = make_plan(model, ids, max_new_tokens=max_new_tokens, first_allowed=first_allowed, **sampling)
    strings = _stop_strings(stop_strings)
    rows = [_RowText(tokenizer, [] if encoder_decoder else row[-_CONTEXT:], set(plan.eos), strings) for row in ids]

    def check(tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Feed each live row its new token; rows whose text reached a stop string stop."""
        stopped = [bool(alive) and row.add(token) for row, token, alive in zip(rows, tokens.tolist(), live.tolist(),
                                                                                  strict=True)]
        return torch.tensor(stopped, device=tokens.device)  # (B,)

    steps = decode_loop(model, plan, check)
    if encoder_decoder:
        shown = [""] * len(prompts)
    if stream:
        return _pieces(shown[0], rows[0], steps)
    for _ in steps:
        pass
    texts = [p + row.text for p, row in zip(shown, rows, strict=True)]
    return texts[0] if single else texts
