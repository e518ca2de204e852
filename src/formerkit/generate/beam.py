"""Beam search over a KV cache, scored exactly as the reference library (transformers 5.x) scores it.

Each input keeps ``num_beams`` running hypotheses in one batch of B * num_beams cache rows.
Every step takes the best ``max(2, 1 + n_eos) * num_beams`` continuations of all beams; the
ones that end (an EOS token, or the last allowed step) and rank among the first num_beams
become finished hypotheses scored ``sum(log-probs) / generated_len ** length_penalty``,
the others continue, and the cache rows are reselected with ``KVCache.reorder``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from formerkit.cache import KVCache
from formerkit.errors import InputError
from formerkit.inputs import check_ids, check_mask
from formerkit.model import Transformer

_NEG = -1.0e9  # the score of an impossible hypothesis (finite, as in the reference, so sums stay ordered)

_Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BeamOutput:
    """What ``beam_search`` returns.

    sequences: (B * num_return_sequences, T_out) the n-best hypotheses of each input, best first,
    prompt (decoder-only) or decoder start token (encoder-decoder) included, padded with the pad id.
    scores: (B * num_return_sequences,) float32, sum of log-probs / generated_len ** length_penalty.
    """

    sequences: torch.Tensor
    scores: torch.Tensor


def _eos_ids(eos_token_id: int | Sequence[int] | None, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The end-of-sequence ids as a (n_eos,) tensor, checked against the vocabulary."""
    if eos_token_id is None:
        ids = []
    else:
        ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise InputError(f"eos_token_id must be token ids in [0, {vocab_size}), got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_args(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int,
                max_new_tokens: int, early_stopping: bool | str, num_return_sequences: int,
                decoder_start_token_id: int | None, length_penalty: float, pad_token_id: int | None) -> None:
    """Raise InputError for a model, input or setting beam search cannot work with."""
    cfg = model.config
    for name, value in [("num_beams", num_beams), ("num_return_sequences", num_return_sequences),
                        ("max_new_tokens", max_new_tokens)]:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or \
            not math.isfinite(length_penalty):
        raise InputError(f"length_penalty must be a finite number, got {length_penalty!r}")
    for name, value in [("pad_token_id", pad_token_id), ("decoder_start_token_id", decoder_start_token_id)]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < cfg.vocab_size):
            raise InputError(f"{name} must be a token id in [0, {cfg.vocab_size}), got {value!r}")
    if cfg.kind == "encoder" or model.lm_head is None:
        raise InputError("beam search needs a decoder-only or encoder-decoder model with a language-model head; "
                         f"got kind={cfg.kind!r}, head={cfg.head!r}")
    if num_beams < 1:
        raise InputError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise InputError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(early_stopping, bool) and early_stopping != "never":
        raise InputError(f'early_stopping must be True, False or "never", got {early_stopping!r}')
    name = "input_ids (the source)" if cfg.kind == "encoder-decoder" else "input_ids (the prompt)"
    check_ids(name, input_ids, cfg)
    check_mask("attention_mask", attention_mask, input_ids)
    if attention_mask is not None:
        if not bool(attention_mask.any(-1).all()):
            raise InputError("a row of attention_mask is all padding: every input needs at least one real token")
        if cfg.kind == "decoder" and not bool(attention_mask[:, -1].all()):
            raise InputError("prompts must be left-padded: attention_mask[:, -1] must be 1 in every row")
    if cfg.kind == "encoder-decoder" and decoder_start_token_id is None:
        raise InputError("an encoder-decoder model needs decoder_start_token_id to start decoding from: pass it, "
                         "or set the config field")
    if cfg.kind == "decoder" and decoder_start_token_id is not None:
        raise InputError("decoder_start_token_id is for encoder-decoder models; a decoder-only model "
                         "continues its prompt")


def _start(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int,
           max_new_tokens: int, start_id: int | None) -> tuple[torch.Tensor, torch.Tensor, _Step]:
    """Prefill a cache of B * num_beams rows; return (decoder prompt (B, P), first logits (B*k, V), step).

    ``step(tokens, rows)`` reorders the cache rows by ``rows`` (B*k,), feeds ``tokens`` (B*k,) and
    returns the next logits (B*k, V).
    """
    B = input_ids.shape[0]
    ids = input_ids.repeat_interleave(num_beams, 0)  # (B*k, S): the beams of an input are adjacent rows
    mask = attention_mask.long().repeat_interleave(num_beams, 0) if attention_mask is not None else None  # (B*k, S)
    if model.config.kind == "encoder-decoder":
        prompt = torch.full((B, 1), start_id, dtype=torch.long, device=input_ids.device)  # (B, 1)
        cache = KVCache.for_model(model, B * num_beams, max_new_tokens)  # start + new tokens; the last is never fed
        first = model(ids, mask, decoder_input_ids=prompt.repeat_interleave(num_beams, 0), cache=cache)

        def step(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            cache.reorder(rows)
            return model(None, decoder_input_ids=tokens[:, None], cache=cache).logits[:, -1]

        return prompt, first.logits[:, -1], step

    cache = KVCache.for_model(model, B * num_beams, input_ids.shape[1] + max_new_tokens - 1)  # the last: never fed
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else None  # (B*k, P): skip left padding
    first = model(ids, mask, position_ids=positions, cache=cache)

    def step(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        nonlocal mask, positions
        cache.reorder(rows)
        if mask is not None:  # the beams of an input share its padding, so mask and positions need no reorder
            mask = F.pad(mask, (0, 1), value=1)  # (B*k, cached + 1)
            positions = positions[:, -1:] + 1  # (B*k, 1)
        return model(tokens[:, None], mask, position_ids=positions, cache=cache).logits[:, -1]

    return input_ids, first.logits[:, -1], step


@torch.no_grad()
def beam_search(
    model: Transformer,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    num_beams: int = 4,
    max_new_tokens: int = 50,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = True,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> BeamOutput:
    """Find the ``num_return_sequences`` best continuations of each input by beam search.

    input_ids: (B, P) prompts of a decoder-only model, left-padded with ``attention_mask`` (B, P);
    or (B, S) sources of an encoder-decoder model, decoded from ``decoder_start_token_id``.
    A hypothesis ends at any id of ``eos_token_id`` or after ``max_new_tokens`` new tokens, and
    scores ``sum(log-probs) / generated_len ** length_penalty`` (generated_len counts the new
    tokens, EOS included). ``early_stopping``: True stops an input once it has ``num_beams``
    finished hypotheses; False and "never" go on while the best running beam might still win,
    estimating its best score at the current length (False) or, for length_penalty > 0, at
    max_new_tokens ("never"). This is the reference library's ``generate(num_beams=...)``.
    Returns a BeamOutput; sequences are padded with pad_token_id (default: the first EOS id).
    decoder_start_token_id defaults to the config's (BART: 2, T5: its pad id 0, from config.json).
    """
    if decoder_start_token_id is None:
        decoder_start_token_id = model.config.decoder_start_token_id
    _check_args(model, input_ids, attention_mask, num_beams, max_new_tokens, early_stopping, num_return_sequences,
                decoder_start_token_id, length_penalty, pad_token_id)
    device = input_ids.device
    eos = _eos_ids(eos_token_id, model.config.vocab_size, device)  # (n_eos,)
    pad = pad_token_id if pad_token_id is not None else int(eos[0]) if len(eos) else 0
    B, k, R = input_ids.shape[0], num_beams, num_return_sequences
    if max_new_tokens == 0:
        prompt = input_ids if model.config.kind == "decoder" else torch.full((B, 1), decoder_start_token_id)
        return BeamOutput(prompt.to(device).repeat_interleave(R, 0), torch.zeros(B * R, device=device))

    prompt, logits, step = _start(model, input_ids, attention_mask, k, max_new_tokens, decoder_start_token_id)
    P, n_keep = prompt.shape[1], max(2, 1 + len(eos)) * k  # n_keep: enough for k to run on after EOS
    first_k = torch.arange(n_keep, device=device) < k  # (n_keep,) only these may finish
    row_offset = torch.arange(B, device=device)[:, None] * k  # (B, 1)
    seqs = torch.full((B, k, P + max_new_tokens), pad, dtype=torch.long, device=device)  # running hypotheses
    seqs[:, :, :P] = prompt[:, None]
    run_scores = torch.full((B, k), _NEG, device=device)  # (B, k) summed log-probs
    run_scores[:, 0] = 0.0  # all beams start equal: let only the first one expand
    done_seqs = seqs.clone()  # (B, k, P + max_new_tokens) finished hypotheses, best first
    done_scores = torch.full((B, k), _NEG, device=device)  # (B, k) length-penalized scores
    done = torch.zeros(B, k, dtype=torch.bool, device=device)  # (B, k) which slots hold a hypothesis
    done_len = torch.zeros(B, k, dtype=torch.long, device=device)  # (B, k) generated tokens of each
    can_improve = torch.ones(B, dtype=torch.bool, device=device)  # (B,) may a running beam still win?

    for t in range(max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B*k, V)
        V = log_probs.shape[-1]
        totals = (log_probs.view(B, k, V) + run_scores[:, :, None]).view(B, k * V)
        top, flat = totals.topk(n_keep, dim=-1)  # (B, n_keep), best first
        beam, token = flat // V, flat % V  # (B, n_keep)
        cand = seqs.gather(1, beam[:, :, None].expand(-1, -1, seqs.shape[-1]))  # (B, n_keep, L)
        cand[:, :, P + t] = token
        ends = torch.isin(token, eos) | (t + 1 == max_new_tokens)  # (B, n_keep)

        live = top + ends.float() * _NEG  # (B, n_keep) ended candidates cannot run on
        run_scores, keep = live.topk(k, dim=-1)  # (B, k)
        seqs = cand.gather(1, keep[:, :, None].expand(-1, -1, cand.shape[-1]))  # (B, k, L)
        rows = (beam.gather(1, keep) + row_offset).view(-1)  # (B*k,) the cache row each new beam extends

        blocked = ~can_improve | (done.all(-1) & (early_stopping is True))  # (B,) this input accepts no more
        finishing = ends & first_k & ~blocked[:, None]  # (B, n_keep)
        new_scores = torch.where(finishing, top / (t + 1) ** length_penalty, _NEG)  # (B, n_keep)
        done_scores, best = torch.cat([done_scores, new_scores], 1).topk(k, dim=-1)  # (B, k) the k best so far
        done = torch.cat([done, finishing], 1).gather(1, best)
        done_len = torch.cat([done_len, torch.full_like(finishing, t + 1, dtype=torch.long)], 1).gather(1, best)
        done_seqs = torch.cat([done_seqs, cand], 1).gather(1, best[:, :, None].expand(-1, -1, cand.shape[-1]))

        best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else t + 1
        best_running = run_scores[:, 0] / best_len**length_penalty  # (B,) its optimistic final score
        can_improve &= best_running > done_scores.min(-1).values  # free slots score _NEG: always beaten
        if t + 1 == max_new_tokens or not can_improve.any() or (early_stopping is True and done.all()):
            break
        logits = step(seqs[:, :, P + t].reshape(-1), rows)  # (B*k, V)

    out_len = P + int(done_len[:, :R].max())
    return BeamOutput(done_seqs[:, :R, :out_len].reshape(B * R, out_len), done_scores[:, :R].reshape(B * R))
