"""Token generation with a KV cache: prefill once, then one forward pass per new token.

``generate`` returns the prompt with its continuation; ``stream`` yields the new tokens as
they are chosen. Both run the same loop (``decode_loop``), so they cannot disagree. Batches of
prompts of different lengths are left-padded; each row's positions come from its mask
(``cumsum - 1``), so a row generates exactly what it would generate alone.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from formerkit.cache import KVCache
from formerkit.config import ModelConfig
from formerkit.errors import InputError
from formerkit.generate.processors import SamplingConfig, choose, process
from formerkit.inputs import check_ids, check_mask

StopCheck = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens (B,), live (B,)) -> stop (B,) bool


def prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache, *,
            decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run the whole prompt through ``model``, filling ``cache``; return the next-token logits (B, V).

    Decoder-only: input_ids (B, T) is the prompt, attention_mask (B, T) marks left padding
    (None: no padding); positions count real tokens only. Encoder-decoder: input_ids is the
    source, encoded once into the cache, and decoder_input_ids (B, 1) starts the target.
    """
    if decoder_input_ids is not None:
        return model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, cache=cache).logits[:, -1]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) if attention_mask is not None else None  # (B, T)
    return model(input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache).logits[:, -1]


def decode_step(model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: KVCache) -> torch.Tensor:
    """Feed one new token per row, tokens (B,), after the cached ones; return the next-token logits (B, V).

    attention_mask (B, cached + 1) covers the cache and the new token (None: no padding).
    For encoder-decoder models the tokens extend the target and the mask is unused.
    """
    if model.config.kind == "encoder-decoder":
        return model(None, decoder_input_ids=tokens[:, None], cache=cache).logits[:, -1]
    positions = attention_mask.sum(-1, keepdim=True) - 1 if attention_mask is not None else None  # (B, 1)
    return model(tokens[:, None], attention_mask=attention_mask, position_ids=positions, cache=cache).logits[:, -1]


@dataclass(frozen=True)
class GenerationPlan:
    """Checked inputs and options of one generation call (made by ``make_plan``, run by ``decode_loop``)."""

    ids: torch.Tensor  # (B, T) prompt (decoder-only) or source (encoder-decoder)
    mask: torch.Tensor  # (B, T) 1 for real tokens
    max_new_tokens: int
    sampling: SamplingConfig
    eos: tuple[int, ...]
    stop: tuple[tuple[int, ...], ...]
    pad: int
    decoder_start: int
    generator: torch.Generator | None
    first_allowed: torch.Tensor | None = None  # (B, V) bool: the tokens each row may choose first (token healing)


def _token_id(name: str, value: object, vocab_size: int) -> int:
    """``value`` as a token id in [0, vocab_size), or an InputError naming the argument."""
    try:
        token = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer token id, got {value!r}") from None
    if not 0 <= token < vocab_size:
        raise InputError(f"{name}={token} is outside the vocabulary [0, {vocab_size}); "
                         "check that the tokenizer matches the model")
    return token


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


def _eos_ids(eos_token_id: int | Sequence[int] | None, vocab_size: int) -> tuple[int, ...]:
    """The EOS ids as a tuple (one id, several, or none)."""
    if eos_token_id is None:
        return ()
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    return tuple(_token_id("eos_token_id", e, vocab_size) for e in ids)


def _stop_sequences(stop: Sequence[Sequence[int]] | None, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """The stop token sequences as tuples, each non-empty."""
    if stop is None:
        return ()
    if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple)):
        raise InputError("stop must be a list of token-id sequences, e.g. [[13, 13]]; for text use stop_strings")
    seqs = []
    for seq in stop:
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)) or not seq:
            raise InputError(f"each stop sequence must be a non-empty list of token ids, got {seq!r}")
        seqs.append(tuple(_token_id("stop", t, vocab_size) for t in seq))
    return tuple(seqs)


def make_plan(model: nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
              attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 50, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
              repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
              stop: Sequence[Sequence[int]] | None = None, seed: int | None = None, pad_token_id: int | None = None,
              decoder_start_token_id: int | None = None,
              first_allowed: torch.Tensor | None = None) -> GenerationPlan:
    """Check every argument of ``generate`` (same defaults) and return them as a plan.

    ``first_allowed`` (B, V) bool limits each row's first new token (token healing).
    Raises InputError saying what to do about a bad argument.
    """
    cfg = model.config
    if cfg.kind == "encoder" or model.lm_head is None or cfg.head != "lm":
        raise InputError(f"generation needs a decoder-only or encoder-decoder model with a language-model head; "
                         f"this is a kind={cfg.kind!r} model with head={cfg.head!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    eos = _eos_ids(eos_token_id, cfg.vocab_size)
    pad = _token_id("pad_token_id", pad_token_id if pad_token_id is not None else (eos[0] if eos else 0),
                    cfg.vocab_size)
    start = decoder_start_token_id if decoder_start_token_id is not None else cfg.decoder_start_token_id
    start = start if start is not None else (pad_token_id or 0)
    start = _token_id("decoder_start_token_id", start, cfg.vocab_size)
    encoder_decoder = cfg.kind == "encoder-decoder"
    ids, mask = _as_batch(input_ids, attention_mask, pad, left=not encoder_decoder,
                          device=next(model.parameters()).device)
    check_ids("input_ids", ids, cfg)
    check_mask("attention_mask", mask, ids)
    ids, mask = ids.long(), mask.long()
    if not encoder_decoder:
        _check_left_padding(mask)
    _check_length(cfg, ids, mask, max_new_tokens, encoder_decoder)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if first_allowed is not None and (tuple(first_allowed.shape) != (ids.shape[0], cfg.vocab_size)
                                      or not bool(first_allowed.any(-1).all())):
        raise InputError(f"first_allowed must be a ({ids.shape[0]}, {cfg.vocab_size}) bool tensor allowing at least "
                         "one token per row")
    return GenerationPlan(ids, mask, max_new_tokens, sampling, eos, _stop_sequences(stop, cfg.vocab_size),
                          pad, start, generator, None if first_allowed is None else first_allowed.to(ids.device))


def _check_left_padding(mask: torch.Tensor) -> None:
    """Require every row of mask (B, T) to be zeros then ones, ending in a real token."""
    if not bool((mask[:, -1] == 1).all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise InputError("attention_mask must mark LEFT padding (zeros before each prompt, ones up to the last "
                         "column): new tokens are appended on the right; pad prompts on the left, or pass lists "
                         "of ids and let generate pad them")


def _check_length(cfg: ModelConfig, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
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


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the model's training flag is restored afterwards."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _stop_sequence_hit(history: list[torch.Tensor], stops: tuple[tuple[int, ...], ...]) -> torch.Tensor | None:
    """Rows whose generated tokens (list of (B,)) now end with one of the stop sequences; (B,) bool or None."""
    hit = None
    for seq in stops:
        if len(seq) > len(history):
            continue
        tail = torch.stack(history[-len(seq):], dim=1)  # (B, L)
        ends = (tail == torch.tensor(seq, device=tail.device)).all(-1)  # (B,)
        hit = ends if hit is None else hit | ends
    return hit


def decode_loop(model: nn.Module, plan: GenerationPlan,
                stop_check: StopCheck | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The decoding loop: yield (tokens (B,), live (B,) bool) once per new token.

    ``live`` marks the rows that were still generating at this step; the other rows get the
    pad id. A row stops after an EOS id, a stop sequence, or when ``stop_check`` says so; the
    loop ends when every row has stopped or after max_new_tokens steps. The model runs in
    eval mode without autograd during each forward pass only, so a paused stream leaves it as it was.
    """
    if plan.max_new_tokens == 0:
        return
    ids, mask = plan.ids, plan.mask
    B, V = ids.shape[0], model.config.vocab_size
    encoder_decoder = model.config.kind == "encoder-decoder"
    padded = not encoder_decoder and not bool(mask.all())
    start = torch.full((B, 1), plan.decoder_start, dtype=torch.long, device=ids.device)  # (B, 1)
    seen = None
    if plan.sampling.repetition_penalty != 1.0:  # tokens each row holds: prompt (or decoder start) and generated
        first, weight = (start, torch.ones_like(start)) if encoder_decoder else (ids, mask)
        seen = torch.zeros(B, V, dtype=torch.long, device=ids.device).scatter_add_(1, first, weight) > 0  # (B, V)
    cache_len = 1 + plan.max_new_tokens if encoder_decoder else ids.shape[1] + plan.max_new_tokens
    with _inference(model):
        cache = KVCache.for_model(model, B, cache_len)
        logits = prefill(model, ids, mask if encoder_decoder or padded else None, cache,
                         decoder_input_ids=start if encoder_decoder else None)  # (B, V)
    live = torch.ones(B, dtype=torch.bool, device=ids.device)  # (B,)
    eos = torch.tensor(plan.eos, dtype=torch.long, device=ids.device)  # (E,)
    history: list[torch.Tensor] = []
    if padded:  # the mask of every column there will be: the prompt's, then ones
        mask = torch.cat([mask, mask.new_ones(B, plan.max_new_tokens)], dim=1)  # (B, T + max_new_tokens)
    for step in range(plan.max_new_tokens):
        if step == 0 and plan.first_allowed is not None:
            logits = logits.masked_fill(~plan.first_allowed, torch.finfo(logits.dtype).min)  # (B, V)
        tokens = choose(process(logits, plan.sampling, seen), plan.sampling, plan.generator)  # (B,)
        tokens = torch.where(live, tokens, plan.pad)
        history.append(tokens)
        done = torch.isin(tokens, eos)  # (B,)
        hit = _stop_sequence_hit(history, plan.stop)
        if hit is not None:
            done |= hit
        if stop_check is not None:
            done |= stop_check(tokens, live)
        yield tokens, live
        if seen is not None:
            seen[torch.arange(B, device=ids.device), tokens] = True
        live = live & ~done
        if step == plan.max_new_tokens - 1 or not bool(live.any()):
            return
        step_mask = mask[:, :cache.length + 1] if padded else None  # (B, T + step + 1)
        with _inference(model):
            logits = decode_step(model, tokens, step_mask, cache)  # (B, V)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Sequence[Sequence[int]] | None = None,
    seed: int | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> torch.Tensor:
    """Extend each prompt by up to ``max_new_tokens`` tokens (greedy unless temperature > 0).

    input_ids: (B, T) ids with attention_mask (B, T) marking LEFT padding, or a list of id
    lists (padded on the left for you, with pad_token_id). eos_token_id (one id or several)
    and stop (token-id sequences) end a row; the EOS / stop tokens are kept and the row is
    then filled with pad_token_id (default: the first EOS id, else 0). seed seeds one
    torch.Generator for the whole call. The loop ends early once every row has stopped.

    Returns (B, T + n) ids: the (padded) prompts and n <= max_new_tokens new columns.
    Encoder-decoder models: input_ids is the source; decoding starts from
    decoder_start_token_id (default: the config's decoder_start_token_id, else pad_token_id,
    else 0) and the result is the decoder
    ids (B, 1 + n), start token first.
    """
    plan = make_plan(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                     eos_token_id=eos_token_id, stop=stop, seed=seed, pad_token_id=pad_token_id,
                     decoder_start_token_id=decoder_start_token_id)
    new = [tokens for tokens, _ in decode_loop(model, plan)]  # n x (B,)
    if model.config.kind == "encoder-decoder":
        prefix = torch.full((plan.ids.shape[0], 1), plan.decoder_start, dtype=torch.long, device=plan.ids.device)
    else:
        prefix = plan.ids
    return torch.cat([prefix, *[t[:, None] for t in new]], dim=1)  # (B, T + n)


def stream(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Sequence[Sequence[int]] | None = None,
    seed: int | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> Iterator[torch.Tensor | int]:
    """Yield the new tokens as they are chosen: one (B,) tensor per step, or an int when B == 1.

    Takes the same arguments as ``generate`` and yields exactly the columns ``generate``
    appends (finished rows yield the pad id). Arguments are checked before the first token.
    """
    plan = make_plan(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                     eos_token_id=eos_token_id, stop=stop, seed=seed, pad_token_id=pad_token_id,
                     decoder_start_token_id=decoder_start_token_id)
    single = plan.ids.shape[0] == 1
    return (int(tokens[0]) if single else tokens for tokens, _ in decode_loop(model, plan))
