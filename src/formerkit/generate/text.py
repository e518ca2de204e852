"""Text in, text out: ``generate_text``, with stop strings and printing-friendly streaming.

Each row's continuation is decoded as a whole after every new token (so a multi-byte
character split over several tokens is never shown half-made), cut before the first stop
string, and released in pieces that never end in U+FFFD or in the beginning of a stop string.
Text is made on the host, so each step reads its tokens back from the device (once per step).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.generate.config import GenerationConfig, with_options
from formerkit.generate.decode import decode_loop
from formerkit.generate.plan import make_plan
from formerkit.generate.prompts import fit_prompts, heal_prompts
from formerkit.generate.translate import beam_texts
from formerkit.tokenizers import Tokenizer

TEXT_CONTEXT = 8  # prompt tokens decoded before the continuation (tokenizers treat a text's start specially)


class RowText:
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


def _pieces(prompt: str, row: RowText, steps: Iterator) -> Iterator[str]:
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


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt_or_prompts: str | Sequence[str],
                  config: GenerationConfig | None = None, *, stream: bool = False, truncate: str | None = None,
                  heal: bool = False, **options) -> str | list[str] | Iterator[str]:
    """Continue a prompt (or a batch of prompts) and return prompt + continuation as text.

    One return type per input type: a str prompt gives a str, a list of prompts a list of str
    (one per prompt, in order), and ``stream=True`` (a str prompt only) an iterator of str
    pieces, the prompt first, that join to the non-streamed result. Encoder-decoder models
    give the generated target text only.

    ``config`` and ``options`` are GenerationConfig fields (max_new_tokens, temperature, top_k,
    top_p, min_p, repetition_penalty, stop, stop_strings, seed, num_beams, ...). Prompts are
    encoded with ``add_special_tokens=False``; an empty one starts from the tokenizer's EOS
    id. A row stops at an EOS id (the config's, else the model config's, else
    ``tokenizer.eos_id``; ``eos_token_id=[]``: none; the EOS is not part of the text) or once
    its continuation contains a stop string; the text is cut before the stop string. With
    num_beams > 1 each text is beam search's best hypothesis (``beam_texts``).

    ``truncate`` ("left" or "right") cuts a prompt longer than ``max_seq_len - max_new_tokens``
    tokens (an encoder-decoder's source: ``max_seq_len``) to that length: "left" drops its start,
    "right" its end; a cut prompt is shown as its kept tokens decoded. ``None`` (default) leaves
    prompts whole, and a prompt too long for learned positions is an InputError. Prompt characters
    a char tokenizer does not know become ``<unk>``, with a FormerkitWarning naming them.

    ``heal`` (token healing, decoder-only models, not with beams): a prompt's last token is taken
    back when other tokens start with its text, and the first new token must start with that
    text. A prompt ending in a space ("def ") otherwise leaves a BPE model a lone space token,
    which its training text almost never has (spaces there belong to the next word's token).
    """
    config = with_options(config, options)
    single = isinstance(prompt_or_prompts, str)
    prompts = [prompt_or_prompts] if single else prompt_or_prompts
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("generate_text takes a prompt string or a non-empty list of prompt strings")
    if stream and not single:
        raise InputError("stream=True takes a single prompt string; generate a list of prompts without streaming")
    if config.num_beams > 1:
        if stream or heal:
            raise InputError(f"beam search (num_beams={config.num_beams}) decides its text at the end and does not "
                             f"heal prompts; drop {'stream=True' if stream else 'heal=True'}, or set num_beams=1")
        texts = beam_texts(model, tokenizer, list(prompts), config, truncate=truncate)
        return texts[0] if single else texts
    encoder_decoder = model.config.kind == "encoder-decoder"
    ids, shown = fit_prompts(tokenizer, prompts, model.config, config.max_new_tokens, truncate)
    first_allowed = None
    if heal and not encoder_decoder:
        ids, shown, first_allowed = heal_prompts(tokenizer, ids, shown, model.config.vocab_size)
    plan = make_plan(model, ids, None, config, tokenizer_eos=tokenizer.eos_id, tokenizer_pad=tokenizer.pad_id,
                     first_allowed=first_allowed)
    rows = [RowText(tokenizer, [] if encoder_decoder else row[-TEXT_CONTEXT:], set(plan.eos), list(config.stop_strings))
            for row in ids]

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
