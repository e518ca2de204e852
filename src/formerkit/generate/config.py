"""``GenerationConfig``: every decoding option in one validated dataclass, shared by all the generators.

``generate``, ``stream``, ``generate_text``, ``beam_search``, ``speculative_generate``,
``beam_texts`` and the command line take ``config: GenerationConfig | None`` plus keyword
overrides named after its fields (``generate(model, ids, max_new_tokens=20)``); ``with_options``
merges the two. A config is checked once, when it is made: types, ranges and combinations,
each error naming the field and what to do. Token ids that depend on the model (EOS, pad,
decoder start) are filled in from the model's ``ModelConfig`` and checked against its
vocabulary by ``special_ids``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from formerkit.config import ModelConfig
from formerkit.errors import InputError, did_you_mean
from formerkit.generate.cache_policy import CachePolicy, parse_cache_policy

EarlyStopping = bool | Literal["never"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: length, how each token is chosen, when a row stops, special ids, beam search.

    max_new_tokens: most tokens added per row (>= 0).
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k, top_p, min_p: when sampling, keep the k likeliest tokens / the smallest set holding
    probability p / tokens at least min_p times as likely as the likeliest (None: off).
    repetition_penalty: CTRL-style, on the tokens a row already holds (1: off; also when greedy).
    seed: seeds one generator, on the model's device, for the whole call (None: a fresh draw).
    eos_token_id: one id or several that end a row (kept in the ids); None: the model config's
    (``ModelConfig.eos_token_id``; for text, else the tokenizer's); () or []: no EOS.
    pad_token_id: fills left padding and the columns after a row stopped; None: the model
    config's, else the tokenizer's (text), else the first EOS id, else 0.
    decoder_start_token_id: encoder-decoder models only, the first decoder token; None: the
    model config's, else the pad id.
    stop: token-id sequences; a row stops once its new tokens end with one (kept).
    stop_strings: text only (``generate_text``): a row stops once its text contains one; the
    text is cut before it.
    num_beams: 1 decodes greedily or samples; > 1 is beam search (``beam_search``).
    num_return_sequences: beam search, the best hypotheses returned per input (<= num_beams).
    length_penalty: beam search, a hypothesis scores sum(log-probs) / new_len ** length_penalty.
    early_stopping: beam search, True stops an input at num_beams finished hypotheses; False
    and "never" go on while a running beam may still win (at the current length / at max_new_tokens).
    cache_policy: which cached tokens to keep under a token budget: a ``CachePolicy`` or a string
    ``KIND[:BUDGET[:EXTRA]]`` ("full", "sliding:64", "sinks:64:4", "h2o:64:32", "tova:64"; see
    ``formerkit.generate.cache_policy``), kept as a CachePolicy. Not with beam search.
    """

    max_new_tokens: int = 50
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    stop: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    cache_policy: CachePolicy | str = CachePolicy()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "cache_policy", parse_cache_policy(self.cache_policy))
        set_(self, "eos_token_id", _id_tuple(self.eos_token_id))
        set_(self, "stop", _stop_sequences(self.stop))
        set_(self, "stop_strings", _stop_strings(self.stop_strings))
        _validate(self)

    @property
    def greedy(self) -> bool:
        """True when each token is the argmax (temperature 0)."""
        return self.temperature == 0

    def beyond_plain_greedy(self) -> list[str]:
        """The options set here that plain greedy decoding does not honour: beams, sampling, a repetition
        penalty, stop sequences or strings, an evicting cache policy (what Jacobi and early-exit decoding refuse)."""
        return [name for name, on in (("num_beams > 1 (beam search)", self.num_beams > 1),
                                      ("temperature > 0 (sampling)", not self.greedy),
                                      ("repetition_penalty", self.repetition_penalty != 1.0),
                                      ("stop", bool(self.stop)), ("stop_strings", bool(self.stop_strings)),
                                      ("cache_policy", self.cache_policy.evicts)) if on]

    def replace(self, **options: Any) -> GenerationConfig:
        """A copy with ``options`` (field names) changed, validated; InputError names an unknown field."""
        return with_options(self, options)


def _integer(name: str, value: object, minimum: int, *, optional: bool = False, hint: str = "") -> None:
    """Require an int (not a bool) >= minimum, or None when optional; InputError naming ``name``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or None" if optional else ""
        raise InputError(f"{name} must be an integer >= {minimum}{none}{hint}, got {value!r}")


def _number(name: str, value: object, *, optional: bool = False) -> bool:
    """Whether ``value`` is a finite number (int or float, not a bool), or None when optional; InputError if neither."""
    if value is None and optional:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number{' or None' if optional else ''}, got {value!r}")
    return True


def _id_tuple(value: object) -> tuple[int, ...] | None:
    """eos_token_id as a tuple of ids (None stays None: the model's default)."""
    if value is None:
        return None
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InputError(f"eos_token_id must be a token id or a list of token ids ([] for none; None for the "
                             f"model's), got {value!r}")
    return tuple(ids)


def _stop_sequences(stop: object) -> tuple[tuple[int, ...], ...]:
    """The stop token sequences as tuples, each non-empty."""
    if stop is None:
        return ()
    if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple)):
        raise InputError("stop must be a list of token-id sequences, e.g. [[13, 13]]; for text use stop_strings")
    seqs = []
    for seq in stop:
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)) or not seq:
            raise InputError(f"each stop sequence must be a non-empty list of token ids, got {seq!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in seq):
            raise InputError(f"each stop sequence must hold token ids (integers >= 0), got {seq!r}")
        seqs.append(tuple(seq))
    return tuple(seqs)


def _stop_strings(strings: object) -> tuple[str, ...]:
    """stop_strings as a tuple of non-empty strings (one string is a list of one)."""
    if strings is None:
        return ()
    strings = (strings,) if isinstance(strings, str) else strings
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise InputError(f"stop_strings must be a list of non-empty strings, got {strings!r}")
    return tuple(strings)


def _validate(c: GenerationConfig) -> None:
    """Types, ranges and combinations of a GenerationConfig; InputError naming the field and the fix."""
    _integer("max_new_tokens", c.max_new_tokens, 0)
    if _number("temperature", c.temperature) and c.temperature < 0:
        raise InputError(f"temperature must be >= 0 (0: greedy), got {c.temperature}")
    _integer("top_k", c.top_k, 1, optional=True, hint=" (None: all tokens)")
    if _number("top_p", c.top_p, optional=True) and not 0 < c.top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {c.top_p}")
    if _number("min_p", c.min_p, optional=True) and not 0 <= c.min_p <= 1:
        raise InputError(f"min_p must be in [0, 1], got {c.min_p}")
    if _number("repetition_penalty", c.repetition_penalty) and c.repetition_penalty <= 0:
        raise InputError(f"repetition_penalty must be > 0 (1: none), got {c.repetition_penalty}")
    if c.seed is not None and (isinstance(c.seed, bool) or not isinstance(c.seed, int)):
        raise InputError(f"seed must be an integer, got {c.seed!r}")
    _integer("pad_token_id", c.pad_token_id, 0, optional=True)
    _integer("decoder_start_token_id", c.decoder_start_token_id, 0, optional=True)
    _integer("num_beams", c.num_beams, 1, hint=" (1: no beam search)")
    _number("length_penalty", c.length_penalty)
    returned = c.num_return_sequences
    if isinstance(returned, bool) or not isinstance(returned, int) or not 1 <= returned <= c.num_beams:
        raise InputError(f"num_return_sequences must be in [1, num_beams={c.num_beams}], got "
                         f"{c.num_return_sequences!r}; raise num_beams to return more hypotheses")
    if not isinstance(c.early_stopping, bool) and c.early_stopping != "never":
        raise InputError(f'early_stopping must be True, False or "never", got {c.early_stopping!r}')
    if c.num_beams > 1:
        check_beam_options(c)


def check_beam_options(c: GenerationConfig) -> None:
    """Refuse the options beam search does not apply (sampling, repetition penalty, stop sequences)."""
    beams = f"beam search (num_beams={c.num_beams})"
    if not c.greedy:
        raise InputError(f"{beams} ranks hypotheses by their log-probabilities and does not sample; set "
                         f"temperature=0 (got {c.temperature}), or num_beams=1 to sample")
    if c.repetition_penalty != 1.0:
        raise InputError(f"{beams} does not apply repetition_penalty={c.repetition_penalty}; set it to 1, "
                         "or num_beams=1")
    if c.stop or c.stop_strings:
        raise InputError(f"{beams} stops at EOS ids only; drop stop / stop_strings, or set num_beams=1")
    if c.cache_policy.evicts:
        raise InputError(f"{beams} reorders whole caches between beams and does not evict; drop "
                         f"cache_policy={str(c.cache_policy)!r} (use 'full'), or set num_beams=1")


def with_options(config: GenerationConfig | None, options: Mapping[str, Any]) -> GenerationConfig:
    """``config`` (default: ``GenerationConfig()``) with ``options`` replacing its fields, validated once.

    An option that is not a field raises InputError naming it, with the closest field name.
    """
    if config is not None and not isinstance(config, GenerationConfig):
        raise InputError(f"config must be a formerkit GenerationConfig, got {type(config).__name__}; pass options "
                         "as keywords or build GenerationConfig(...)")
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    for name in options:
        if name not in names:
            raise InputError(f"{name!r} is not a generation option{did_you_mean(name, names)}; the options are "
                             f"the GenerationConfig fields: {', '.join(names)}")
    base = config if config is not None else GenerationConfig()
    return dataclasses.replace(base, **options) if options else base


@dataclass(frozen=True)
class SpecialIds:
    """The token ids one call uses: eos (the ids that end a row), pad, and the decoder start id (encoder-decoder)."""

    eos: tuple[int, ...]
    pad: int
    start: int


def _in_vocabulary(name: str, token: int, vocab_size: int) -> int:
    if not 0 <= token < vocab_size:
        raise InputError(f"{name}={token} is outside the vocabulary [0, {vocab_size}); "
                         "check that the tokenizer matches the model")
    return token


def special_ids(config: GenerationConfig, model: ModelConfig, *, tokenizer_eos: int | None = None,
                tokenizer_pad: int | None = None) -> SpecialIds:
    """The EOS, pad and decoder start ids of a call: the config's, else the model config's, else the fallbacks.

    EOS: config, else ``model.eos_token_id``, else ``tokenizer_eos``. Pad: config, else
    ``model.pad_token_id``, else ``tokenizer_pad``, else the first EOS id, else 0. Decoder start
    (encoder-decoder only; InputError when given for a decoder-only model): config, else
    ``model.decoder_start_token_id``, else the pad id. Every id is checked against the vocabulary.
    """
    vocab = model.vocab_size
    if config.eos_token_id is not None:
        eos = config.eos_token_id
    elif model.eos_token_id is not None:
        eos = _id_tuple(model.eos_token_id)
    else:
        eos = () if tokenizer_eos is None else (operator.index(tokenizer_eos),)
    eos = tuple(_in_vocabulary("eos_token_id", e, vocab) for e in eos)
    pad = next((p for p in (config.pad_token_id, model.pad_token_id, tokenizer_pad) if p is not None),
               eos[0] if eos else 0)
    pad = _in_vocabulary("pad_token_id", pad, vocab)
    if config.decoder_start_token_id is not None and model.kind != "encoder-decoder":
        raise InputError("decoder_start_token_id is for encoder-decoder models; a decoder-only model continues its "
                         "prompt: leave it None")
    start = next((s for s in (config.decoder_start_token_id, model.decoder_start_token_id) if s is not None), pad)
    for seq in config.stop:
        for token in seq:
            _in_vocabulary("stop", token, vocab)
    return SpecialIds(eos, pad, _in_vocabulary("decoder_start_token_id", start, vocab))

