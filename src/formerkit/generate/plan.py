"""The checks of one generation call, done once: inputs as a (B, T) batch, the special ids, the length limit.

``make_plan`` turns a model, prompts (a tensor with its mask, or lists of ids) and a
``GenerationConfig`` into a ``GenerationPlan``: everything the decoding loop needs, on the
model's device, so that the loop itself checks nothing and reads nothing back per token.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from formerkit.config import ModelConfig
from formerkit.errors import InputError
from formerkit.generate.cache_policy import check_policy
from formerkit.generate.config import GenerationConfig, special_ids
from formerkit.inputs import check_ids, check_mask


@dataclass(frozen=True)
class GenerationPlan:
    """Checked inputs and options of one generation call (made by ``make_plan``, run by ``decode_loop``)."""

    ids: torch.Tensor  # (B, T) prompt (decoder-only) or source (encoder-decoder)
    mask: torch.Tensor  # (B, T) 1 for real tokens
    config: GenerationConfig
    eos: tuple[int, ...]
    pad: int
    decoder_start: int
    generator: torch.Generator | None  # on the model's device
    eos_ids: torch.Tensor  # (E,) the EOS ids on the model's device
    stop_ids: tuple[torch.Tensor, ...]  # each (L,): the stop sequences on the model's device
    first_allowed: torch.Tensor | None = None  # (B, V) bool: the tokens each row may choose first (token healing)

    @property
    def max_new_tokens(self) -> int:
        """The config's max_new_tokens."""
        return self.config.max_new_tokens


def _check_model(model: nn.Module) -> ModelConfig:
    """The model's config, after checking that it can generate: a decoder or encoder-decoder with an LM head."""
    cfg = model.config
    if cfg.kind == "encoder" or getattr(model, "lm_head", None) is None or cfg.head != "lm":
        raise InputError(f"generation needs a decoder-only or encoder-decoder model with a language-model head; "
                         f"this is a kind={cfg.kind!r} model with head={cfg.head!r}")
    return cfg


def _as_batch(input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None, pad: int,
             left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a (B, T) tensor or a list of id lists into ids (B, T) and a mask (B, T), padding ragged lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] and input_ids.shape[1] == 0:
            raise InputError("the prompt is empty (shape (B, 0)); give at least one token, e.g. the EOS id")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return input_ids.to(device), mask.to(device)
    if attention_mask is not None:
        raise InputError("attention_mask goes with a tensor of ids; for lists of ids the padding is built for you")
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise InputError("input_ids must be a (B, T) tensor of token ids or a non-empty list of lists of ids")
    rows = []
    for i, row in enumerate(input_ids):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise InputError(f"input_ids[{i}] must be a list of token ids, got {type(row).__name__}; "
                             "wrap a single prompt in a list: [[id, id, ...]]")
        if not row:
            raise InputError(f"prompt {i} is empty; give at least one token, e.g. the EOS id")
        try:
            rows.append([operator.index(t) for t in row])
        except TypeError:
            raise InputError(f"input_ids[{i}] must hold integer token ids") from None
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


def make_plan(model: nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
              attention_mask: torch.Tensor | None, config: GenerationConfig, *,
              tokenizer_eos: int | None = None, tokenizer_pad: int | None = None,
              first_allowed: torch.Tensor | None = None) -> GenerationPlan:
    """Check a call's model, inputs and ids once and return them as a plan on the model's device.

    Special ids come from ``special_ids`` (the config's, else the model config's, else the
    tokenizer's). ``first_allowed`` (B, V) bool limits each row's first new token (token healing).
    Raises InputError saying what to do about a bad argument.
    """
    cfg = _check_model(model)
    check_policy(config.cache_policy, cfg)
    ids_ = special_ids(config, cfg, tokenizer_eos=tokenizer_eos, tokenizer_pad=tokenizer_pad)
    encoder_decoder = cfg.kind == "encoder-decoder"
    device = next(model.parameters()).device
    ids, mask = _as_batch(input_ids, attention_mask, ids_.pad, left=not encoder_decoder, device=device)
    check_ids("input_ids", ids, cfg)
    check_mask("attention_mask", mask, ids)
    ids, mask = ids.long(), mask.long()
    if not bool(mask.any(-1).all()):
        raise InputError("a row of attention_mask is all padding: every input needs at least one real token")
    if not encoder_decoder:
        check_left_padding(mask)
    check_length(cfg, ids, mask, config.max_new_tokens, encoder_decoder)
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    if first_allowed is not None and (tuple(first_allowed.shape) != (ids.shape[0], cfg.vocab_size)
                                      or not bool(first_allowed.any(-1).all())):
        raise InputError(f"first_allowed must be a ({ids.shape[0]}, {cfg.vocab_size}) bool tensor allowing at least "
                         "one token per row")
    stop_ids = tuple(torch.tensor(seq, dtype=torch.long, device=device) for seq in config.stop)
    return GenerationPlan(ids, mask, config, ids_.eos, ids_.pad, ids_.start, generator,
                          torch.tensor(ids_.eos, dtype=torch.long, device=device), stop_ids,
                          None if first_allowed is None else first_allowed.to(device))


def check_left_padding(mask: torch.Tensor) -> None:
    """Require every row of mask (B, T) to be zeros then ones, ending in a real token."""
    if not bool((mask[:, -1] == 1).all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise InputError("attention_mask must mark LEFT padding (zeros before each prompt, ones up to the last "
                         "column): new tokens are appended on the right; pad prompts on the left, or pass lists "
                         "of ids and let generate pad them")


def check_length(cfg: ModelConfig, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 encoder_decoder: bool) -> None:
    """With learned positions, the longest sequence must fit in max_seq_len; other schemes have no limit.

    The InputError says by how much it is too long and what fits: a shorter prompt (or
    ``truncate``), or fewer new tokens.
    """
    if cfg.position != "learned":
        return
    limit, cut = cfg.max_seq_len, "truncate='left' or 'right' in generate_text, --truncate on the command line"
    if encoder_decoder:
        if ids.shape[1] > limit:
            raise InputError(f"the source has {ids.shape[1]} tokens, but this model's learned positions stop at "
                             f"max_seq_len={limit}; shorten the source by {ids.shape[1] - limit} tokens ({cut})")
        if 1 + max_new_tokens > limit:
            raise InputError(f"the decoder start token + max_new_tokens={max_new_tokens} = {1 + max_new_tokens} "
                             f"exceeds this model's max_seq_len={limit} (learned positions); lower max_new_tokens "
                             f"to {limit - 1}")
        return
    prompt = int(mask.sum(-1).max())
    total = prompt + max_new_tokens
    if total <= limit:
        return
    room = limit - max_new_tokens  # prompt tokens that fit beside max_new_tokens
    advice = [f"shorten the prompt by {total - limit} tokens, to {room} ({cut})"] if room >= 1 else []
    if prompt < limit:
        advice.append(f"lower max_new_tokens to {limit - prompt}")
    if not advice:
        advice.append(f"lower max_new_tokens below {limit} and shorten the prompt to fit beside it ({cut})")
    raise InputError(f"the longest prompt ({prompt} tokens) + max_new_tokens={max_new_tokens} = {total} exceeds "
                     f"this model's max_seq_len={limit} (learned positions) by {total - limit}; "
                     + ", or ".join(advice))
