"""formerkit's logits processors against transformers' on random logits: the same numbers, the same kept tokens.

Repetition penalty, temperature, top-k and min-p are the same arithmetic in both libraries, so
their outputs must be equal bit for bit, ties and negative logits included. Top-p sums
probabilities in a different order (descending mass before a token against ascending mass up to
it), so the kept sets are compared away from the boundary: a token whose mass before it lies
within 1e-6 of p may fall either way. The whole chain (penalty, temperature, top-k, top-p,
min-p, in transformers' order) is compared the same way.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require
from formerkit.generate.config import GenerationConfig
from formerkit.generate.processors import (
    min_p_filter,
    process,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)

transformers = require("transformers")
FUZZ = settings(max_examples=60, deadline=None)
BOUNDARY = 1e-6  # top-p: how close to p the mass before a token may be for the two sums to disagree


@st.composite
def logits_and_history(draw, max_vocab: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, V) of any sign, ties and zeros included, and previous ids (B, T) with repeats."""
    b, v, t = draw(st.integers(1, 3)), draw(st.integers(1, max_vocab)), draw(st.integers(1, 30))
    values = draw(st.lists(st.floats(-50, 50, width=32) | st.sampled_from([0.0, 1.0, -1.0]),
                           min_size=b * v, max_size=b * v))
    ids = draw(st.lists(st.integers(0, v - 1), min_size=b * t, max_size=b * t))
    return torch.tensor(values).view(b, v), torch.tensor(ids).view(b, t)


@st.composite
def distinct_logits(draw) -> torch.Tensor:
    """Logits (B, V) drawn from a seeded normal at a random scale: no ties, probabilities far from underflow."""
    b, v = draw(st.integers(1, 3)), draw(st.integers(1, 60))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return torch.randn(b, v, generator=generator) * draw(st.floats(0.1, 5.0))


def _seen(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) bool: the tokens present in each row of ids (B, T)."""
    return torch.zeros(ids.shape[0], vocab, dtype=torch.bool).scatter_(1, ids, True)


def _theirs(processor, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A transformers processor applied to a copy (some write into the scores they are given)."""
    return processor(ids, logits.clone())


def _clear_of_the_top_p_boundary(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) bool: tokens whose probability mass before them (more likely tokens) is not within BOUNDARY of p."""
    probs = logits.double().softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = (sorted_probs.cumsum(-1) - sorted_probs).scatter(-1, order, sorted_probs.cumsum(-1) - sorted_probs)
    return (before - p).abs() > BOUNDARY


@FUZZ
@given(logits_and_history(), st.floats(0.05, 5.0))
def test_repetition_penalty_equals_transformers(case, penalty):
    logits, ids = case
    theirs = _theirs(transformers.RepetitionPenaltyLogitsProcessor(penalty), ids, logits)
    assert torch.equal(repetition_penalty(logits, _seen(ids, logits.shape[1]), penalty), theirs)
    assert torch.equal(process(logits, GenerationConfig(repetition_penalty=penalty), _seen(ids, logits.shape[1])),
                       theirs)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    """The example the fuzzing starts from, spelled out: seen twice counts once, unseen tokens are untouched."""
    logits, ids = torch.tensor([[2.0, -2.0, 0.0, 3.0]]), torch.tensor([[0, 1, 1, 2]])
    expected = torch.tensor([[1.0, -4.0, 0.0, 3.0]])
    assert torch.equal(repetition_penalty(logits, _seen(ids, 4), 2.0), expected)
    assert torch.equal(_theirs(transformers.RepetitionPenaltyLogitsProcessor(2.0), ids, logits), expected)


@FUZZ
@given(logits_and_history(), st.floats(0.05, 5.0))
def test_temperature_equals_transformers(case, temperature):
    logits, ids = case
    theirs = _theirs(transformers.TemperatureLogitsWarper(temperature), ids, logits)
    assert torch.equal(process(logits, GenerationConfig(temperature=temperature)), theirs)


@FUZZ
@given(logits_and_history(), st.integers(1, 50))
def test_top_k_equals_transformers(case, k):
    logits, ids = case
    assert torch.equal(top_k_filter(logits, k), _theirs(transformers.TopKLogitsWarper(k), ids, logits))


@FUZZ
@given(logits_and_history(), st.floats(0.0, 1.0))
def test_min_p_equals_transformers(case, min_p):
    logits, ids = case
    assert torch.equal(min_p_filter(logits, min_p), _theirs(transformers.MinPLogitsWarper(min_p), ids, logits))


@FUZZ
@given(distinct_logits(), st.floats(0.01, 1.0))
def test_top_p_keeps_the_tokens_transformers_keeps(logits, p):
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    ours, theirs = top_p_filter(logits, p), _theirs(transformers.TopPLogitsWarper(p), ids, logits)
    clear = _clear_of_the_top_p_boundary(logits, p)
    assert torch.equal(ours.isfinite()[clear], theirs.isfinite()[clear])
    assert torch.equal(ours[ours.isfinite()], logits[ours.isfinite()])  # kept logits are unchanged
    assert bool(ours.isfinite().any(-1).all())  # the likeliest token is always kept


@FUZZ
@given(distinct_logits(), st.data())
def test_the_sampling_chain_equals_transformers(logits, data):
    """Penalty, temperature, top-k, top-p and min-p together, in the order transformers' generate applies them."""
    vocab = logits.shape[1]
    ids = torch.tensor([data.draw(st.lists(st.integers(0, vocab - 1), min_size=5, max_size=5))] * logits.shape[0])
    cfg = GenerationConfig(temperature=data.draw(st.floats(0.1, 2.0)), top_k=data.draw(st.integers(1, 60)),
                         top_p=data.draw(st.floats(0.05, 0.999)), min_p=data.draw(st.floats(0.0, 0.5)),
                         repetition_penalty=data.draw(st.floats(0.5, 2.0)))
    first = transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty),
                                              transformers.TemperatureLogitsWarper(cfg.temperature),
                                              transformers.TopKLogitsWarper(cfg.top_k)])
    last = transformers.LogitsProcessorList([transformers.TopPLogitsWarper(cfg.top_p),
                                             transformers.MinPLogitsWarper(cfg.min_p)])
    before_top_p = _theirs(first, ids, logits)
    theirs = _theirs(last, ids, before_top_p)
    ours = process(logits, cfg, _seen(ids, vocab))
    clear = _clear_of_the_top_p_boundary(before_top_p, cfg.top_p)
    assert torch.equal(ours.isfinite()[clear], theirs.isfinite()[clear])
    if bool(clear.all()):  # no token on the boundary: the same numbers everywhere
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("p", [0.3, 0.7, 0.95])
def test_top_p_on_a_fixed_distribution(p):
    """Probabilities 0.5, 0.25, 0.125, ...: the nucleus is the fewest tokens reaching p, as in transformers."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))
    kept = top_p_filter(logits, p).isfinite()[0].tolist()
    theirs = _theirs(transformers.TopPLogitsWarper(p), torch.zeros(1, 1, dtype=torch.long), logits)
    assert kept == theirs.isfinite()[0].tolist() == {0.3: [True] + [False] * 4, 0.7: [True, True] + [False] * 3,
                                                     0.95: [True] * 5}[p]
