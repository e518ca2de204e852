"""Per-request sampling in a shared batch: each row keeps its own options, generator and seen tokens.

``SamplingParams`` are the options of one request (OpenAI's names: ``max_tokens``, ``stop``
...). A ``RowSampler`` turns that request's next-token logits (1, V) into a token with
formerkit's own logits processors (``generate.processors``) and the request's own
``torch.Generator``, so a seeded request draws the same tokens whatever else shares the batch,
and the same tokens ``fk.generate(..., seed=...)`` draws for it alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from formerkit.errors import InputError
from formerkit.generate.config import GenerationConfig
from formerkit.generate.processors import choose, process


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: length, sampling options, seed, stops and log-probabilities.

    max_tokens: most new tokens (>= 1). temperature 0 is greedy. top_k, top_p, min_p,
    repetition_penalty: as in ``GenerationConfig`` (None / 1.0: off). seed: the request's own
    generator (None: a fresh draw). stop_token_ids: token sequences that end the request;
    stop: strings that end it (the text is cut before them; needs a tokenizer). logprobs:
    how many top alternatives to report per token (None: no log-probabilities; 0: the chosen
    token's only). ignore_eos: keep generating past EOS ids.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False

    def generation_config(self) -> GenerationConfig:
        """These options as a validated ``GenerationConfig`` (InputError names a bad field)."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InputError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        return GenerationConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                seed=self.seed, stop=self.stop_token_ids, stop_strings=self.stop)


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probability of a chosen token and of the ``top`` likeliest tokens (id, logprob), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


class RowSampler:
    """Chooses the tokens of one request from its logits (1, V), with its own generator and seen tokens."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device) -> None:
        self.config = params.generation_config()
        self.logprobs = params.logprobs
        self.generator = (torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None)
        self.seen = None
        if self.config.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)  # (1, V)
            self.seen[0, torch.tensor(prompt, device=device)] = True

    def choose(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """The next token for logits (1, V), and its log-probabilities when the request asked for them.

        Log-probabilities are those of the model's distribution (log-softmax of the raw logits),
        as the OpenAI API reports them, not of the filtered sampling distribution.
        """
        token = int(choose(process(logits, self.config, self.seen), self.config, self.generator)[0])
        if self.seen is not None:
            self.seen[0, token] = True
        if self.logprobs is None:
            return token, None
        logp = logits[0].float().log_softmax(-1)  # (V,)
        top = logp.topk(self.logprobs) if self.logprobs else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
        return token, TokenLogprobs(float(logp[token]), pairs)
