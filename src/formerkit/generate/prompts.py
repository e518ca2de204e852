"""Prompts as token ids for the text generators: encoded, checked for unknown characters, fitted to the context."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence

import torch

from formerkit.config import ModelConfig
from formerkit.errors import FormerkitWarning, InputError
from formerkit.tokenizers import CharTokenizer, Tokenizer

TRUNCATE_SIDES = ("left", "right")


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt without special tokens; an empty prompt starts from the EOS id."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if ids:
        return ids
    if tokenizer.eos_id is None:
        raise InputError("the prompt is empty and the tokenizer has no end-of-text token to start from; "
                         "give a non-empty prompt")
    return [tokenizer.eos_id]


def prompt_room(cfg: ModelConfig, max_new_tokens: int) -> int:
    """How many prompt tokens fit in the model's context beside ``max_new_tokens`` new ones.

    An encoder-decoder's source has all of ``max_seq_len``; a decoder's prompt what max_new_tokens
    leaves of it. Raises InputError when that is nothing.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if cfg.kind == "encoder-decoder":
        return cfg.max_seq_len
    room = cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in this model's "
                         f"max_seq_len={cfg.max_seq_len}; lower max_new_tokens (--max-new-tokens) to at most "
                         f"{cfg.max_seq_len - 1} to truncate the prompt")
    return room


def fit_prompts(tokenizer: Tokenizer, prompts: Sequence[str], cfg: ModelConfig, max_new_tokens: int,
                truncate: str | None) -> tuple[list[list[int]], list[str]]:
    """The prompts' token ids, and each prompt's text as it will be shown in front of its continuation.

    truncate None keeps every prompt whole; "left" keeps the last tokens of a prompt longer than
    ``prompt_room``, dropping its start; "right" keeps the first. A cut prompt is shown as its kept
    tokens decoded; the others as given. Characters a char tokenizer does not know become
    ``<unk>``; one FormerkitWarning per call names them all.
    """
    if truncate is not None and truncate not in TRUNCATE_SIDES:
        raise InputError(f'truncate must be "left", "right" or None, got {truncate!r}')
    if isinstance(tokenizer, CharTokenizer):
        unknown = tokenizer.unknown_chars("".join(prompts))
        if unknown:
            warnings.warn(f"prompt characters unknown to the char tokenizer become <unk>: "
                          f"{', '.join(map(repr, unknown))} (its training text had none of them)",
                          FormerkitWarning, stacklevel=3)
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    if truncate is None:
        return rows, list(prompts)
    room = prompt_room(cfg, max_new_tokens)
    shown = list(prompts)
    for i, row in enumerate(rows):
        if len(row) > room:
            rows[i] = row[-room:] if truncate == "left" else row[:room]
            shown[i] = tokenizer.decode(rows[i])
    return rows, shown


_TOKEN_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """The text of every token id below ``vocab_size`` decoded alone (special tokens: empty), cached per tokenizer."""
    texts = _TOKEN_TEXTS.get(tokenizer)
    if texts is None or len(texts) != vocab_size:
        texts = [tokenizer.decode([i]) if i < tokenizer.vocab_size else "" for i in range(vocab_size)]
        _TOKEN_TEXTS[tokenizer] = texts
    return texts


def heal_prompts(tokenizer: Tokenizer, rows: list[list[int]], shown: list[str],
                 vocab_size: int) -> tuple[list[list[int]], list[str], torch.Tensor | None]:
    """Token healing: take back each prompt's last token where other tokens extend its text.

    Returns the prompts' ids (a healed row one token shorter), their texts as they will be shown
    (a healed row without the taken-back text), and the tokens allowed as each row's first new
    token, (B, vocab_size) bool: those whose text starts with the taken-back text (every token
    for a row left as it was); None when no row was healed.
    """
    texts = token_texts(tokenizer, vocab_size)
    allowed = torch.ones(len(rows), vocab_size, dtype=torch.bool)  # (B, V)
    rows, shown, healed = [list(r) for r in rows], list(shown), False
    for i, row in enumerate(rows):
        tail = texts[row[-1]] if len(row) >= 2 else ""
        extends = [j for j, text in enumerate(texts) if tail and text.startswith(tail)]
        if len(extends) < 2 or not shown[i].endswith(tail):  # nothing longer to choose, or not the prompt's end
            continue
        allowed[i] = False
        allowed[i, extends] = True
        rows[i], shown[i], healed = row[:-1], shown[i][: len(shown[i]) - len(tail)], True
    return rows, shown, allowed if healed else None
