"""Token generation with a static KV cache: prefill once, then one forward pass per new token.

``generate`` returns the prompt with its continuation; ``stream`` yields the new tokens as
they are chosen, one (B,) tensor per step. Both run the same loop (``decode_loop``), so they
cannot disagree. Batches of prompts of different lengths are left-padded; each row's
positions come from its mask (``cumsum - 1``), so a row generates exactly what it would
generate alone.

The loop is built for devices that run ahead of the host. Everything is checked once per
call (``make_plan``); the per-token work (``choose_next`` and ``steps.decode_step``) has fixed
tensor shapes and never reads a value back from the device. The one read is whether every
row has stopped: ``generate`` makes it every ``steps.SYNC_EVERY`` steps on an accelerator
(every step on the CPU, where it costs nothing) and trims the extra columns at the end;
``stream`` makes it every step, as its consumer reads each token anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from formerkit.cache import KVCache
from formerkit.errors import InputError
from formerkit.generate.beam import beam_search
from formerkit.generate.config import GenerationConfig, with_options
from formerkit.generate.eviction import Evictor
from formerkit.generate.plan import GenerationPlan, make_plan
from formerkit.generate.processors import choose, process
from formerkit.generate.steps import decode_step, inference, prefill, start_decoding, sync_interval
from formerkit.layers.linear import tune_linears

StopCheck = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens (B,), live (B,)) -> stop (B,) bool


@dataclass
class DecodeState:
    """What the loop carries from one token to the next (see ``decode_loop``)."""

    cache: KVCache
    logits: torch.Tensor  # (B, V) the next-token logits
    positions: torch.Tensor  # (B,) the position of each row's next token
    live: torch.Tensor  # (B,) bool: the rows still generating
    seen: torch.Tensor | None  # (B, V) bool: the tokens each row holds (repetition penalty only)
    recent: list[torch.Tensor] = field(default_factory=list)  # the last new tokens (B,) each, for stop sequences


def start_state(model: nn.Module, plan: GenerationPlan, evictor: Evictor | None = None) -> DecodeState:
    """Prefill a cache for ``plan`` and return the loop's first state (all rows live).

    With an ``evictor`` (a cache policy other than full) the cache is the evictor's, bounded.
    """
    ids, mask = plan.ids, plan.mask
    B, V = ids.shape[0], model.config.vocab_size
    if evictor is None:
        cache, logits, positions = start_decoding(model, ids, mask, plan.decoder_start, plan.max_new_tokens)
    else:
        cache = evictor.new_cache(model, B, ids.shape[1], plan.max_new_tokens)
        with evictor.watch():
            logits = prefill(model, ids, None if bool(mask.all()) else mask, cache)
        positions = evictor.after_pass(cache, mask.sum(-1))  # (B,)
    seen = None
    if plan.config.repetition_penalty != 1.0:  # tokens each row holds: prompt (or decoder start) and generated
        if model.config.kind == "encoder-decoder":
            seen = torch.zeros(B, V, dtype=torch.bool, device=ids.device)  # (B, V)
            seen[:, plan.decoder_start] = True
        else:
            seen = torch.zeros(B, V, dtype=torch.long, device=ids.device).scatter_add_(1, ids, mask) > 0  # (B, V)
    return DecodeState(cache, logits, positions, torch.ones(B, dtype=torch.bool, device=ids.device), seen)


def choose_next(plan: GenerationPlan, state: DecodeState, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row (B,) from ``state.logits``, and which rows it stops (B,) bool.

    Rows that stopped earlier get the pad id. A row stops at an EOS id or when its new tokens
    end with a stop sequence. Reads nothing back from the device.
    """
    logits = state.logits  # (B, V)
    if step == 0 and plan.first_allowed is not None:
        logits = logits.masked_fill(~plan.first_allowed, torch.finfo(logits.dtype).min)
    tokens = choose(process(logits, plan.config, state.seen), plan.config, plan.generator)  # (B,)
    tokens = torch.where(state.live, tokens, plan.pad)
    if state.seen is not None:
        state.seen.scatter_(1, tokens[:, None], True)
    done = (tokens[:, None] == plan.eos_ids).any(-1)  # (B,)
    if plan.stop_ids:
        longest = max(len(seq) for seq in plan.config.stop)
        state.recent = [*state.recent, tokens][-longest:]
        for seq, ids in zip(plan.config.stop, plan.stop_ids, strict=True):
            if len(seq) <= len(state.recent):
                done = done | (torch.stack(state.recent[-len(seq):], dim=1) == ids).all(-1)  # (B,)
    return tokens, done


def decode_loop(model: nn.Module, plan: GenerationPlan, stop_check: StopCheck | None = None,
                sync_every: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The decoding loop: yield (tokens (B,), live (B,) bool) once per new token.

    ``live`` marks the rows that were still generating at this step; the other rows get the
    pad id. A row stops after an EOS id, a stop sequence, or when ``stop_check`` says so. The
    loop ends after max_new_tokens steps, or once every row has stopped, which it reads from
    the device every ``sync_every`` steps (so up to sync_every - 1 steps of pad columns, with
    ``live`` all False, may follow the last real one). The model runs in eval mode without
    autograd during each forward pass only, so a paused stream leaves it as it was (a cache
    policy's hooks, too, are registered for each pass only). Under a cache policy other than
    full the cache is bounded and evicted after every pass (``eviction.Evictor``).
    """
    if plan.max_new_tokens == 0:
        return
    tune_linears(model)  # the CPU's few-row kernel for this model's dtype, measured once per process
    evictor = Evictor(model, plan.config.cache_policy) if plan.config.cache_policy.evicts else None
    with inference(model):
        state = start_state(model, plan, evictor)
    for step in range(plan.max_new_tokens):
        tokens, done = choose_next(plan, state, step)
        if stop_check is not None:
            done = done | stop_check(tokens, state.live)
        yield tokens, state.live
        state.live = state.live & ~done
        if step == plan.max_new_tokens - 1 or ((step + 1) % sync_every == 0 and not bool(state.live.any())):
            return
        with inference(model), evictor.watch() if evictor is not None else contextlib.nullcontext():
            state.logits = decode_step(model, tokens, state.positions, state.cache)  # (B, V)
        state.positions = state.positions + 1
        if evictor is not None:
            with inference(model):
                state.positions = evictor.after_pass(state.cache, state.positions)  # (B,)


def _token_plan(model: nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
                attention_mask: torch.Tensor | None, config: GenerationConfig) -> GenerationPlan:
    """The plan of ``generate`` and ``stream``, which take token ids (no stop strings)."""
    if config.stop_strings:
        raise InputError("stop_strings are text: pass them to generate_text with a tokenizer; for token ids use "
                         "stop=[[id, ...]]")
    return make_plan(model, input_ids, attention_mask, config)


def generate(model: nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
             config: GenerationConfig | None = None, *, attention_mask: torch.Tensor | None = None,
             **options) -> torch.Tensor:
    """Extend each prompt by up to ``max_new_tokens`` tokens; return the ids (greedy unless temperature > 0).

    input_ids: (B, T) ids with attention_mask (B, T) marking LEFT padding, or a list of id
    lists (padded on the left for you). ``config`` (a GenerationConfig) and ``options`` (its
    field names, e.g. ``max_new_tokens=20, temperature=0.8``; they override the config) say
    how: see GenerationConfig. EOS ids (default: the model config's ``eos_token_id``) and stop
    sequences end a row; they are kept and the row is then filled with the pad id. The loop
    ends early once every row has stopped.

    Returns (B, T + n) ids: the (padded) prompts and n <= max_new_tokens new columns.
    Encoder-decoder models: input_ids is the source, decoding starts from the decoder start
    id and the result is the decoder ids (B, 1 + n), start token first. With num_beams > 1 the
    result is beam search's best sequences, (B * num_return_sequences, T_out) (``beam_search``).
    """
    config = with_options(config, options)
    if config.num_beams > 1:
        return beam_search(model, input_ids, config, attention_mask=attention_mask).sequences
    plan = _token_plan(model, input_ids, attention_mask, config)
    steps = list(decode_loop(model, plan, sync_every=sync_interval(plan.ids.device)))
    if model.config.kind == "encoder-decoder":
        prefix = torch.full((plan.ids.shape[0], 1), plan.decoder_start, dtype=torch.long, device=plan.ids.device)
    else:
        prefix = plan.ids
    if not steps:
        return prefix
    new = torch.stack([tokens for tokens, _ in steps], dim=1)  # (B, steps)
    n = int(torch.stack([live for _, live in steps], dim=1).any(0).sum())  # steps in which some row was live
    return torch.cat([prefix, new[:, :n]], dim=1)  # (B, T + n)


def stream(model: nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
           config: GenerationConfig | None = None, *, attention_mask: torch.Tensor | None = None,
           **options) -> Iterator[torch.Tensor]:
    """Yield the new tokens as they are chosen: one (B,) long tensor per step, whatever B (also 1).

    Takes the same arguments as ``generate`` (num_beams must be 1) and yields exactly the
    columns ``generate`` appends (finished rows yield the pad id); ``int(t[0])`` is the token
    of a one-row batch. Arguments are checked before the first token.
    """
    config = with_options(config, options)
    if config.num_beams > 1:
        raise InputError(f"stream yields one token per step, but beam search (num_beams={config.num_beams}) "
                         "decides its sequences at the end; use generate or beam_search, or num_beams=1")
    plan = _token_plan(model, input_ids, attention_mask, config)
    return (tokens for tokens, _ in decode_loop(model, plan))
