"""Speculative decoding: a small draft model proposes tokens, the target model checks them in one pass.

Each round the draft proposes ``k`` tokens one at a time (with its own KV cache); the target
scores the last accepted token and all ``k`` proposals in ONE forward pass (with its cache).
Proposal ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``, where ``p`` and
``q`` are the target's and the draft's next-token distributions after the same sampling
processing (temperature, top-k, top-p, min-p). At the first rejection a replacement is drawn from
``norm(max(0, p_i - q_i))``; when all ``k`` are accepted a bonus token is drawn from ``p_{k+1}``.
This is the rejection scheme of Leviathan et al. (2023) and Chen et al. (2023): the output
follows exactly the distribution of sampling from the target alone. Greedy decoding is the
special case where ``p`` and ``q`` are one-hot on their argmax, so a proposal is kept exactly when
it is the target's argmax, and the output is identical to the target's own greedy decoding.
Rejected tokens are rolled back with ``KVCache.truncate`` (later writes overwrite them). Each
round reads the accepted count back from the device: the next round's shapes depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formerkit.cache import KVCache
from formerkit.errors import InputError
from formerkit.generate.config import GenerationConfig, with_options
from formerkit.generate.plan import check_length, make_plan
from formerkit.generate.processors import process, sample
from formerkit.generate.steps import inference
from formerkit.layers.linear import tune_linears
from formerkit.model import Transformer


@dataclass
class SpeculativeOutput:
    """What ``speculative_generate`` returns.

    sequences: (1, T + n) the prompt followed by the n generated tokens (an EOS token, when one
    ends generation, is included). acceptance_rate: num_accepted / num_proposed draft tokens
    (0.0 when none were proposed). target_calls: forward passes of the target model.
    """

    sequences: torch.Tensor
    acceptance_rate: float
    target_calls: int
    num_proposed: int
    num_accepted: int


def _check_models(target: Transformer, draft: Transformer) -> None:
    """Require two decoder-only formerkit Transformers with LM heads and the same vocabulary."""
    for name, model in (("target", target), ("draft", draft)):
        if not isinstance(model, Transformer) or model.config.kind != "decoder" or model.lm_head is None:
            raise InputError(f"the {name} model must be a decoder-only formerkit Transformer with an LM head")
    if target.config.vocab_size != draft.config.vocab_size:
        raise InputError(f"target and draft must share a tokenizer, but their vocab sizes differ "
                         f"({target.config.vocab_size} vs {draft.config.vocab_size})")


def _distribution(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Next-token probabilities (N, V) of raw logits (N, V): one-hot on the argmax when greedy."""
    processed = process(logits, cfg)  # (N, V) float32
    if cfg.greedy:
        return F.one_hot(processed.argmax(-1), processed.shape[-1]).float()
    return processed.softmax(-1)


def _draw(weights: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token id (1,) from non-negative weights (V,): the argmax when greedy, else a sample."""
    if cfg.greedy:
        return weights.argmax(-1, keepdim=True)
    return sample(weights[None], generator)  # (1,)


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    """A uniform draw in [0, 1), made on ``device`` (the generator's) and read back."""
    return torch.rand(1, generator=generator, device=device).item()


def _propose(draft: Transformer, cache: KVCache, ids: torch.Tensor, k: int, cfg: GenerationConfig,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Let the draft extend ``ids`` (1, L) by k tokens; return them (k,) and their distributions (k, V)."""
    tokens, dists = [], []
    new = ids[:, cache.length:]  # (1, L - cached): what the draft has not seen yet
    for _ in range(k):
        q = _distribution(draft(new, cache=cache).logits[:, -1], cfg)[0]  # (V,)
        token = _draw(q, cfg, generator)  # (1,)
        tokens.append(token)
        dists.append(q)
        new = token[None]  # (1, 1)
    if not tokens:
        return ids.new_empty(0), ids.new_empty(0, draft.config.vocab_size, dtype=torch.float32)
    return torch.cat(tokens), torch.stack(dists)


def _verify(p: torch.Tensor, q: torch.Tensor, proposals: torch.Tensor, cfg: GenerationConfig,
            generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """Accept a prefix of ``proposals`` (k,) by rejection against target p (k + 1, V) and draft q (k, V).

    Returns the number n of accepted proposals and the next token (1,): drawn from
    norm(max(0, p_n - q_n)) after a rejection, or from p_k when all k were accepted.
    """
    for i, token in enumerate(proposals.tolist()):
        u = 0.0 if cfg.greedy else _uniform(generator, p.device)
        if u * q[i, token].item() < p[i, token].item():  # u < p/q: x_i is kept with probability min(1, p/q)
            continue
        return i, _draw((p[i] - q[i]).clamp(min=0), cfg, generator)
    return len(proposals), _draw(p[-1], cfg, generator)


def speculative_generate(target: Transformer, draft: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]],
                         config: GenerationConfig | None = None, *, num_draft_tokens: int = 4,
                         **options) -> SpeculativeOutput:
    """Generate up to ``max_new_tokens`` tokens from ``target``, ``draft`` proposing ``num_draft_tokens`` a round.

    input_ids: (1, T) prompt ids, or [[id, ...]]; batch size 1 only. Both models are
    decoder-only formerkit Transformers sharing one tokenizer (same vocab_size) on the same
    device; they run in eval mode without autograd for the call. ``config`` and ``options``
    are GenerationConfig fields (max_new_tokens, temperature, top_k, top_p, min_p, eos_token_id,
    seed; no beams, repetition penalty or stop sequences). temperature 0 is greedy and gives
    exactly the target's greedy output (``generate``); otherwise the output is distributed as
    sampling from the target with the same options. An EOS id (default: the target config's)
    ends generation and is kept; with learned positions prompt + max_new_tokens must fit in
    max_seq_len; ``seed`` seeds one generator on the models' device. Returns a SpeculativeOutput.
    """
    _check_models(target, draft)
    config = with_options(config, options)
    unsupported = [name for name, on in (("num_beams", config.num_beams > 1),
                                         ("repetition_penalty", config.repetition_penalty != 1.0),
                                         ("stop", bool(config.stop)), ("stop_strings", bool(config.stop_strings)),
                                         ("cache_policy", config.cache_policy.evicts))
                   if on]
    if unsupported:
        raise InputError(f"speculative_generate does not support {', '.join(unsupported)}; leave "
                         f"{'it' if len(unsupported) == 1 else 'them'} at the default, or use generate")
    plan = make_plan(target, input_ids, None, config)
    max_new_tokens = config.max_new_tokens
    if plan.ids.shape[0] != 1:
        raise InputError(f"speculative_generate decodes one sequence at a time (batch size 1), "
                         f"got a batch of {plan.ids.shape[0]}; loop over the rows")
    check_length(draft.config, plan.ids, plan.mask, max_new_tokens, encoder_decoder=False)
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise InputError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
    generator, ids, eos = plan.generator, plan.ids, plan.eos_ids  # ids: (1, L); eos: (E,)
    limit = ids.shape[1] + max_new_tokens
    proposed = accepted = calls = 0
    tune_linears(target)
    tune_linears(draft)
    with inference(target), inference(draft):
        target_cache, draft_cache = KVCache.for_model(target, 1, limit), KVCache.for_model(draft, 1, limit)
        done = False
        while not done and ids.shape[1] < limit:
            L = ids.shape[1]
            k = min(num_draft_tokens, limit - L - 1)  # the round adds at most k + 1 tokens
            proposals, q = _propose(draft, draft_cache, ids, k, config, generator)  # (k,), (k, V)
            fed = torch.cat([ids[:, target_cache.length:], proposals[None]], dim=1)  # (1, L - cached + k)
            p = _distribution(target(fed, cache=target_cache).logits[0, -(k + 1):], config)  # (k + 1, V)
            calls += 1
            n, token = _verify(p, q, proposals, config, generator)
            proposed, accepted = proposed + k, accepted + n
            new = torch.cat([proposals[:n], token])  # (n + 1,)
            stops = (new[:, None] == eos).any(-1)  # (n + 1,)
            if stops.any():
                new, done = new[: int(stops.nonzero()[0]) + 1], True
            ids = torch.cat([ids, new[None]], dim=1)  # (1, L + n + 1) at most
            target_cache.truncate(L + n)  # both caches now hold at most ids[:, :-1]
            draft_cache.truncate(min(draft_cache.length, L + n))
    return SpeculativeOutput(sequences=ids, acceptance_rate=accepted / proposed if proposed else 0.0,
                             target_calls=calls, num_proposed=proposed, num_accepted=accepted)
