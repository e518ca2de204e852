"""Jacobi (parallel) greedy decoding (Santilli et al., 2023): guess a block of tokens, refine it in parallel.

Greedy decoding is the fixed point of y_i = argmax p(y_i | y_<i, x) for every position of a block at
once. Each round feeds the last accepted token followed by the current guesses for the next
``block_size - 1`` tokens in ONE forward pass (with the KV cache), and reads the argmax at every
position. The first output is the greedy token for sure; output i + 1 is too when the first i
guesses equal the first i outputs. That verified prefix is accepted (at least one token a round,
so never slower in passes than greedy), the cache keeps the keys and values of the verified
inputs only (``KVCache.truncate``), and the unverified outputs become the next round's guesses.
The result is identical to ``generate``'s greedy output; what changes is the number of forward
passes, which drops when the model's predictions stop depending on the last few tokens (copies,
repetitions, boilerplate).

A batch accepts, each round, the shortest verified prefix of its live rows, so every row stays
at the same cache position; rows that stopped get the pad id, as in ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from formerkit.errors import InputError
from formerkit.generate.config import GenerationConfig, with_options
from formerkit.generate.plan import make_plan
from formerkit.generate.processors import process
from formerkit.generate.steps import inference, start_decoding
from formerkit.layers.linear import tune_linears
from formerkit.model import Transformer


@dataclass
class JacobiOutput:
    """What ``jacobi_generate`` returns.

    sequences: as ``generate`` returns them ((B, T + n), or (B, 1 + n) decoder ids for encoder–decoder
    models). forward_passes: passes of the model, the prefill included. new_tokens: n, the new columns.
    """

    sequences: torch.Tensor
    forward_passes: int
    new_tokens: int

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per forward pass (greedy decoding makes 1.0)."""
        return self.new_tokens / max(self.forward_passes, 1)


def _check_options(config: GenerationConfig, block_size: object) -> None:
    """InputError for options Jacobi decoding cannot honour exactly."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"block_size must be an integer >= 1, got {block_size!r}")
    unsupported = config.beyond_plain_greedy()
    if unsupported:
        raise InputError(f"Jacobi decoding is greedy decoding computed in parallel; it does not take "
                         f"{', '.join(unsupported)}. Leave those at their defaults, or use generate")


def jacobi_generate(model: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]],
                    config: GenerationConfig | None = None, *, block_size: int = 8,
                    attention_mask: torch.Tensor | None = None, **options) -> JacobiOutput:
    """Greedy decoding of up to ``max_new_tokens`` tokens, ``block_size`` positions refined per forward pass.

    Takes what ``generate`` takes (prompts as a left-padded (B, T) tensor with its mask, or lists of
    ids; the source, for encoder–decoder models) with greedy options only: max_new_tokens, EOS and
    pad ids. The sequences equal ``generate(model, input_ids, ...)``'s. block_size 1 is plain greedy
    decoding. Returns a JacobiOutput.
    """
    config = with_options(config, options)
    _check_options(config, block_size)
    plan = make_plan(model, input_ids, attention_mask, config)
    B, pad = plan.ids.shape[0], plan.pad
    prefix = (torch.full((B, 1), plan.decoder_start, dtype=torch.long, device=plan.ids.device)
              if model.config.kind == "encoder-decoder" else plan.ids)
    if plan.max_new_tokens == 0:
        return JacobiOutput(prefix, 0, 0)
    tune_linears(model)
    with inference(model):
        cache, logits, positions = start_decoding(model, plan.ids, plan.mask, plan.decoder_start,
                                                  plan.max_new_tokens)
        last = process(logits, config).argmax(-1)  # (B,) the first new token
        live = torch.ones(B, dtype=torch.bool, device=last.device)
        columns, passes = [], 1
        guesses = torch.full((B, block_size - 1), pad, dtype=torch.long, device=last.device)  # (B, m - 1)
        while True:
            last = torch.where(live, last, pad)
            columns.append(last)
            live = live & ~(last[:, None] == plan.eos_ids).any(-1)
            if len(columns) == plan.max_new_tokens or not bool(live.any()):
                break
            k = min(block_size - 1, plan.max_new_tokens - len(columns) - 1)  # guesses fed this round
            fed = torch.cat([last[:, None], guesses[:, :k]], dim=1)  # (B, k + 1)
            steps = torch.arange(k + 1, device=fed.device)
            out = model.decode(fed, positions[:, None] + steps, cache)  # (B, k + 1, V)
            passes += 1
            best = process(out.flatten(0, 1), config).argmax(-1).view(B, k + 1)  # (B, k + 1)
            verified = (guesses[:, :k] == best[:, :k]).long().cumprod(1).sum(1)  # (B,) leading guesses confirmed
            n = 1 + int(torch.where(live, verified, k).min())  # tokens every live row accepts
            cache.truncate(cache.length - (k + 1) + n)  # keep `last` and the n - 1 confirmed guesses
            positions = positions + n
            for i in range(n - 1):  # all but the newest enter the output now; the newest is `last`
                token = torch.where(live, best[:, i], pad)
                columns.append(token)
                live = live & ~(token[:, None] == plan.eos_ids).any(-1)
            last = best[:, n - 1]
            guesses = torch.cat([best[:, n:], guesses.new_full((B, block_size - 1 - (k + 1 - n)), pad)], dim=1)
            if not bool(live.any()):
                break
    new = torch.stack(columns, dim=1)  # (B, n)
    return JacobiOutput(torch.cat([prefix, new], dim=1), passes, new.shape[1])
