"""Beam search over a KV cache, scored exactly as the reference library (transformers 5.x) scores it.

Each input keeps ``num_beams`` running hypotheses in one batch of B * num_beams cache rows.
Every step takes the best ``max(2, 1 + n_eos) * num_beams`` continuations of all beams; the
ones that end (an EOS token, or the last allowed step) and rank among the first num_beams
become finished hypotheses scored ``sum(log-probs) / generated_len ** length_penalty``,
the others continue, and the cache rows are reselected with ``KVCache.reorder``. A step reads
nothing back from the device; whether every input is finished is read every step on the
CPU and every ``SYNC_EVERY`` steps on an accelerator (steps after that change nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from formerkit.generate.config import GenerationConfig, check_beam_options, with_options
from formerkit.generate.plan import make_plan
from formerkit.generate.steps import decode_step, start_decoding, sync_interval
from formerkit.layers.linear import tune_linears
from formerkit.model import Transformer

_NEG = -1.0e9  # the score of an impossible hypothesis (finite, as in the reference, so sums stay ordered)


@dataclass(frozen=True)
class BeamOutput:
    """What ``beam_search`` returns.

    sequences: (B * num_return_sequences, T_out) the n-best hypotheses of each input, best first,
    prompt (decoder-only) or decoder start token (encoder-decoder) included, padded with the pad id.
    scores: (B * num_return_sequences,) float32, sum of log-probs / generated_len ** length_penalty.
    """

    sequences: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def beam_search(model: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]],
                config: GenerationConfig | None = None, *, attention_mask: torch.Tensor | None = None,
                **options) -> BeamOutput:
    """Find the ``num_return_sequences`` best continuations of each input by beam search.

    input_ids: (B, P) prompts of a decoder-only model, left-padded with ``attention_mask`` (B, P)
    (or lists of ids); or (B, S) sources of an encoder-decoder model, decoded from the decoder
    start id. ``config`` and ``options`` are GenerationConfig fields; without a config,
    num_beams defaults to 4 here. A hypothesis ends at an EOS id (default: the model config's)
    or after max_new_tokens new tokens, and scores ``sum(log-probs) / generated_len **
    length_penalty`` (generated_len counts the new tokens, EOS included). ``early_stopping``:
    True stops an input once it has ``num_beams`` finished hypotheses; False (default) and
    "never" go on while the best running beam might still win, estimating its best score at the
    current length (False) or, for length_penalty > 0, at max_new_tokens ("never"). This is the
    reference library's ``generate(num_beams=...)``. Returns a BeamOutput; sequences are padded
    with the pad id (default: the model config's, else the first EOS id, else 0).
    """
    config = with_options(config, options if config is not None else {"num_beams": 4, **options})
    check_beam_options(config)
    plan = make_plan(model, input_ids, attention_mask, config)
    device, ids, eos = plan.ids.device, plan.ids, plan.eos_ids  # eos: (n_eos,)
    pad, max_new_tokens, length_penalty = plan.pad, config.max_new_tokens, config.length_penalty
    early_stopping = config.early_stopping
    B, k, R = ids.shape[0], config.num_beams, config.num_return_sequences
    encoder_decoder = model.config.kind == "encoder-decoder"
    prompt = torch.full((B, 1), plan.decoder_start, dtype=torch.long, device=device) if encoder_decoder else ids
    if max_new_tokens == 0:
        return BeamOutput(prompt.repeat_interleave(R, 0), torch.zeros(B * R, device=device))
    tune_linears(model)

    # the beams of an input are adjacent rows and share its padding, so positions need no reordering
    cache, logits, positions = start_decoding(model, ids.repeat_interleave(k, 0), plan.mask.repeat_interleave(k, 0),
                                              plan.decoder_start, max_new_tokens)  # (B*k, V), (B*k,)
    sync_every = sync_interval(device)
    P, n_keep = prompt.shape[1], max(2, 1 + len(plan.eos)) * k  # n_keep: enough for k to run on after EOS
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
        ends = (token[:, :, None] == eos).any(-1) | (t + 1 == max_new_tokens)  # (B, n_keep)

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
        if t + 1 == max_new_tokens:
            break
        if (t + 1) % sync_every == 0 and (not can_improve.any() or (early_stopping is True and done.all())):
            break
        cache.reorder(rows)
        logits = decode_step(model, seqs[:, :, P + t].reshape(-1), positions, cache)  # (B*k, V)
        positions = positions + 1

    out_len = P + int(done_len[:, :R].max())
    return BeamOutput(done_seqs[:, :R, :out_len].reshape(B * R, out_len), done_scores[:, :R].reshape(B * R))
